"""TGI launcher flags that tgi-mp has no option of its own for, so that a deployment's
`text-generation-launcher` command line starts tgi-mp unchanged: each flag maps onto
tgi-mp's options, is accepted with a logged note (it cannot change anything here),
or is refused with what to use instead. Every other TGI 3.3 flag is one of tgi-mp's
own options (`tgi_mp.options`); the README's table lists them all.
"""

from __future__ import annotations

import logging
import os
import platform
from dataclasses import dataclass
from typing import Any, Literal

import click

from tgi_mp.options import Option

log = logging.getLogger("tgi_mp.serve")

Kind = Literal["maps", "noted", "refused"]


@dataclass(frozen=True)
class TgiFlag:
    option: Option
    kind: Kind
    note: str  # logged (noted), the error (refused), or what it maps to (maps)


def _flag(flag: str, kind: Kind, note: str, type: Any = None, envvar: bool = True) -> TgiFlag:
    default = False if type is None else None
    return TgiFlag(
        Option(flag, default, f"TGI's flag: {note}", type=type, envvar=envvar), kind, note
    )


TGI_FLAGS: tuple[TgiFlag, ...] = (
    _flag("--max-input-length", "maps", "the legacy name of --max-input-tokens", int),
    _flag("--sharded", "maps", "true: --num-shard N >= 2 must be given", click.BOOL),
    _flag(
        "--huggingface-hub-cache",
        "maps",
        "the Hugging Face cache directory (sets HF_HUB_CACHE)",
        str,
    ),
    _flag(
        "--rope-scaling",
        "maps",
        "linear RoPE scaling by --rope-factor (dynamic NTK scaling is refused)",
        click.Choice(["linear", "dynamic"]),
    ),
    _flag("--rope-factor", "maps", "the RoPE scaling factor (linear)", float),
    _flag("--disable-custom-kernels", "maps", "--attention torch: no C++ or Triton attention"),
    _flag("--env", "maps", "logs the runtime environment at start", envvar=False),
    _flag("--prometheus-port", "noted", "/metrics is served on --port", int),
    _flag(
        "--shard-uds-path", "noted", "tgi-mp's processes talk in a private runtime directory", str
    ),
    _flag("--master-addr", "noted", "tensor parallelism rendezvous in the runtime directory", str),
    _flag("--master-port", "noted", "tensor parallelism rendezvous in the runtime directory", int),
    _flag(
        "--usage-stats",
        "noted",
        "tgi-mp collects and sends no usage statistics",
        click.Choice(["on", "off", "no-stack"]),
    ),
    _flag(
        "--kv-cache-dtype",
        "refused",
        "an fp8 KV cache is not supported: the KV cache takes the model's --dtype",
        str,
    ),
    _flag(
        "--weights-cache-override",
        "refused",
        "pass the weights' directory as --model-id (or set --huggingface-hub-cache)",
        str,
    ),
    _flag("--ngrok", "refused", "ngrok tunnels are not supported: put a proxy before --port"),
    _flag("--ngrok-authtoken", "refused", "ngrok tunnels are not supported", str),
    _flag("--ngrok-edge", "refused", "ngrok tunnels are not supported", str),
)
BY_NAME = {f.option.name: f for f in TGI_FLAGS}


def click_options(fn: Any) -> Any:
    for f in reversed(TGI_FLAGS):
        fn = f.option.click_option()(fn)
    return fn


def take(given: dict[str, Any]) -> dict[str, Any]:
    """The TGI flags' values, taken out of click's."""
    return {name: given.pop(name) for name in list(given) if name in BY_NAME}


def apply(values: dict[str, Any], o: dict[str, dict[str, Any]]) -> None:
    """The TGI flags' values into `o` (the split options): maps them, logs the notes,
    raises UsageError for a refused one."""
    set_ = {k: v for k, v in values.items() if v not in (None, False)}
    f, e = o["frontend"], o["engine"]
    for name, value in set_.items():
        flag = BY_NAME[name]
        if flag.kind == "refused":
            raise click.UsageError(f"{flag.option.flag}: {flag.note}")
        if flag.kind == "noted":
            log.info("%s %s accepted: %s", flag.option.flag, value, flag.note)
    if "max_input_length" in set_:
        if f.get("max_input_tokens") is not None:  # TGI's rule: not both
            raise click.UsageError(
                "`max_input_tokens` and `max_input_length` are the same; give one"
            )
        f["max_input_tokens"] = set_["max_input_length"]
    if "sharded" in values and values["sharded"] is not None:
        shards = e.get("num_shards", 1)
        if values["sharded"] and shards < 2:
            raise click.UsageError(
                "`sharded` is true but `num_shard` <= 1: give --num-shard N, the number of "
                "executors (tgi-mp does not count the devices for you)"
            )
        if values["sharded"] is False and shards != 1:
            raise click.UsageError("`sharded` is false but `num_shard` != 1")
    if "huggingface_hub_cache" in set_:
        os.environ["HF_HUB_CACHE"] = set_["huggingface_hub_cache"]
    scaling, factor = values.get("rope_scaling"), values.get("rope_factor")
    if scaling == "dynamic":
        raise click.UsageError("--rope-scaling dynamic (NTK-aware) is not supported; linear is")
    if scaling is not None or factor is not None:
        if factor is None:
            raise click.UsageError("--rope-scaling linear needs --rope-factor")
        e["rope_factor"] = float(factor)
    if set_.get("disable_custom_kernels"):
        e["attention"] = "torch"
    if set_.get("env"):
        log_environment()


def log_environment() -> None:
    """TGI's `--env`: what this process runs on, in one log line per fact."""
    import torch

    facts = {
        "Python": platform.python_version(),
        "Platform": platform.platform(),
        "torch": torch.__version__,
        "CUDA": torch.version.cuda or "none",
        "GPUs": ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        or "none",
        "CPU threads": str(os.cpu_count()),
        "CPU capability": torch.backends.cpu.get_cpu_capability(),
    }
    for key, value in facts.items():
        log.info("env: %s: %s", key, value)
