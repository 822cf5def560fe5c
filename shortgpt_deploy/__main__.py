from .cli import app

app(prog_name="shortgpt-deploy")
