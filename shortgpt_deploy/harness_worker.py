"""The subprocess side of harness.run_lm_eval, run by a Python that has lm-eval (.venv-lmeval):
`python -m shortgpt_deploy.harness_worker REQUEST.json`. It loads the model as our scoring does (modeling.load_model,
modeling.decide_add_bos), hands it to the harness's HFLM, runs `simple_evaluate` and writes the results, the
harness version and (when asked) the logged samples to the request's "out" file. Exit 3: lm_eval does not import.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)
SAMPLE_KEYS = ("doc_id", "target", "resps", "filtered_resps", "acc", "acc_norm")


def _plain(value: Any) -> Any:
    """numpy scalars and other leftovers in the harness's results, as JSON can hold them."""
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def _prepend_bos(tokenizer: Any) -> None:
    """Make `tokenizer(text, add_special_tokens=True)` start with BOS. The harness's add_bos_token=True only asks
    the tokenizer for its special tokens, and one that adds none (a BOS the model wants but its tokenizer.json does
    not insert) would be read without the BOS our scoring prepends (multiple_choice.encode_pair)."""
    from tokenizers import processors

    bos = tokenizer.bos_token
    if bos is None or not hasattr(tokenizer, "backend_tokenizer"):
        raise SystemExit(f"the model wants BOS but its tokenizer ({type(tokenizer).__name__}) cannot prepend one")
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tokenizer.bos_token_id)]
    )


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    request = json.loads(Path(argv[1]).read_text())
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        print(f"lm_eval does not import: {err}", file=sys.stderr)
        return 3
    from shortgpt_deploy.modeling import decide_add_bos, load_model, tokenizer_adds_bos

    model, tokenizer = load_model(Path(request["model"]), dtype=request["dtype"])
    add_bos = decide_add_bos(tokenizer, requested=request["add_bos"])
    if add_bos and not tokenizer_adds_bos(tokenizer):
        _prepend_bos(tokenizer)
    # add_bos_token as our scoring decides it, so both sides read the same token ids.
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=request["batch_size"], add_bos_token=add_bos)
    manager = TaskManager(include_path=request["include_path"]) if request["include_path"] else TaskManager()
    raw = lm_eval.simple_evaluate(
        model=lm,
        tasks=request["tasks"],
        num_fewshot=request["shots"],
        limit=request["limit"],
        task_manager=manager,
        log_samples=request["log_samples"],
    )
    if raw is None:
        print("lm-evaluation-harness returned no results (it does so on non-zero ranks)", file=sys.stderr)
        return 1
    out = {
        "version": getattr(lm_eval, "__version__", "?"),
        "add_bos": add_bos,
        "results": raw["results"],
        "n-samples": raw.get("n-samples", {}),
    }
    if request["log_samples"]:
        out["samples"] = {
            task: [{k: s[k] for k in SAMPLE_KEYS if k in s} for s in samples]
            for task, samples in raw.get("samples", {}).items()
        }
    Path(request["out"]).write_text(json.dumps(out, default=_plain))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
