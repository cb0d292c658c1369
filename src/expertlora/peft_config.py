"""PEFT's adapter_config.json: rank, alpha and scaling per module, with PEFT's own pattern rules."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from packaging.version import InvalidVersion, Version

from .errors import AdapterError
from .lora import LoRASpec, lora_scaling

CONFIG_NAME = "adapter_config.json"
# Options that change the math in ways the plain LoRA product does not express.
_UNSUPPORTED_TRUE = ("use_dora", "lora_bias", "use_qalora", "use_bdlora")


@dataclass(frozen=True)
class PeftLoraConfig:
    """The parts of a LoRA adapter_config.json that decide the math."""

    r: int
    lora_alpha: float
    use_rslora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    target_parameters: tuple[str, ...] = ()
    peft_version: str | None = None
    base_model: str | None = None
    path: Path | None = None

    def spec(self, key: str) -> LoRASpec:
        """Rank, alpha, scaling for a module (or ``module.parameter``) name, as PEFT resolves them."""
        r = self.rank_pattern.get(_pattern_key(self.rank_pattern, key), self.r)
        alpha = self.alpha_pattern.get(_pattern_key(self.alpha_pattern, key), self.lora_alpha)
        return LoRASpec(int(r), float(alpha), lora_scaling(int(r), float(alpha), self.use_rslora))

    def version(self) -> Version | None:
        if not self.peft_version:
            return None
        try:  # PEFT writes e.g. "0.21.2" or "0.18.0.dev0@<commit>"
            return Version(self.peft_version.split("@")[0])
        except InvalidVersion:
            return None

    @classmethod
    def from_file(cls, path: str | Path) -> "PeftLoraConfig":
        path = Path(path)
        try:
            cfg = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise AdapterError(path, None, "valid JSON", f"{e.msg} at line {e.lineno}") from None
        if not isinstance(cfg, dict):
            raise AdapterError(path, None, "a JSON object", type(cfg).__name__)
        for key in ("rank_pattern", "alpha_pattern"):
            for pattern in cfg.get(key) or {}:
                try:
                    re.compile(pattern)
                except re.error as e:
                    raise AdapterError(path, f"{key}.{pattern}", "a regular expression", str(e)) from None
        peft_type = cfg.get("peft_type", "LORA")
        if str(peft_type).upper() != "LORA":
            raise AdapterError(path, "peft_type", "LORA", repr(peft_type))
        for key in _UNSUPPORTED_TRUE:
            if cfg.get(key):
                raise AdapterError(path, key, "false (only plain LoRA is supported)", repr(cfg[key]))
        if cfg.get("fan_in_fan_out"):
            raise AdapterError(path, "fan_in_fan_out", "false", "true")
        r, alpha = cfg.get("r"), cfg.get("lora_alpha")
        if not isinstance(r, int) or r <= 0:
            raise AdapterError(path, "r", "a positive integer", repr(r))
        if not isinstance(alpha, (int, float)):
            raise AdapterError(path, "lora_alpha", "a number", repr(alpha))
        return cls(
            r=r,
            lora_alpha=float(alpha),
            use_rslora=bool(cfg.get("use_rslora", False)),
            rank_pattern=dict(cfg.get("rank_pattern") or {}),
            alpha_pattern=dict(cfg.get("alpha_pattern") or {}),
            target_parameters=tuple(cfg.get("target_parameters") or ()),
            peft_version=cfg.get("peft_version"),
            base_model=cfg.get("base_model_name_or_path"),
            path=path,
        )


def _pattern_key(patterns: dict, key: str) -> str | None:
    # PEFT's rule (peft.utils.other.get_pattern_key): the first pattern p with
    # re.match(rf"(.*\.)?({p})$", key) wins.
    for p in patterns:
        if re.match(rf"(.*\.)?({p})$", key):
            return p
    return None
