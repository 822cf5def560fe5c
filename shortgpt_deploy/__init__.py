"""shortgpt-deploy: depth-prune LLMs by Block Influence (ShortGPT) and ship the result.

Pipeline, one module per stage: recipe → modeling → calibration → importance → plan → surgery → report.
`pipeline.build` runs them in that order; the CLI (`cli/`) only parses arguments and prints.
"""

__version__ = "0.1.0"
