"""PEFT's adapter_config.json: rank, alpha and scaling per module, with PEFT's own pattern rules."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from packaging.version import InvalidVersion, Version

from .errors import AdapterError
from .jsonfile import Fields, check_int, check_number, describe, number_text, read_json_object
from .linear_regex import PatternError, PatternSet
from .lora import MAX_ALPHA, MAX_RANK, LoRASpec

CONFIG_NAME = "adapter_config.json"
# Options that change the math in ways the plain LoRA product does not express.
_UNSUPPORTED_TRUE = ("use_dora", "lora_bias", "use_qalora", "use_bdlora")
_MAX_PATTERNS = 100_000


@dataclass(frozen=True)
class PeftLoraConfig:
    """The parts of a LoRA adapter_config.json that decide the math, each checked on creation."""

    r: int
    lora_alpha: float
    use_rslora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    target_parameters: tuple[str, ...] = ()
    peft_version: str | None = None
    base_model: str | None = None
    path: Path | None = None
    # PEFT's rule, matched in bounded time (linear_regex): the first pattern p with
    # re.match(rf"(.*\.)?({p})$", name) gives the module's rank / alpha.
    _patterns: dict[str, tuple[PatternSet, tuple]] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        where = self.path or CONFIG_NAME
        check_int(self.r, 1, MAX_RANK, lambda: AdapterError(where, "r", f"an integer from 1 to {MAX_RANK}", describe(self.r)))
        check_number(self.lora_alpha, MAX_ALPHA, lambda: AdapterError(where, "lora_alpha", number_text(MAX_ALPHA), describe(self.lora_alpha)))
        if not isinstance(self.use_rslora, bool):
            raise AdapterError(where, "use_rslora", "true or false (a JSON boolean)", describe(self.use_rslora))
        object.__setattr__(self, "_patterns", {
            "rank_pattern": _patterns(where, "rank_pattern", self.rank_pattern, lambda v, err: check_int(v, 1, MAX_RANK, err), f"an integer rank from 1 to {MAX_RANK}"),
            "alpha_pattern": _patterns(where, "alpha_pattern", self.alpha_pattern, lambda v, err: check_number(v, MAX_ALPHA, err), number_text(MAX_ALPHA)),
        })
        if not isinstance(self.target_parameters, tuple) or not all(isinstance(t, str) for t in self.target_parameters):
            raise AdapterError(where, "target_parameters", "a list of strings", describe(self.target_parameters))
        for key in ("peft_version", "base_model"):
            value = getattr(self, key)
            if value is not None and not isinstance(value, str):
                raise AdapterError(where, key, "a string", describe(value))

    def spec(self, key: str) -> LoRASpec:
        """Rank, alpha, scaling for a module (or ``module.parameter``) name, as PEFT resolves them."""
        r = self._lookup("rank_pattern", key, self.r)
        alpha = self._lookup("alpha_pattern", key, self.lora_alpha)
        return LoRASpec.of(r, float(alpha), self.use_rslora, self.path or CONFIG_NAME, key)

    def version(self) -> Version | None:
        if not self.peft_version:
            return None
        try:  # PEFT writes e.g. "0.21.2" or "0.18.0.dev0@<commit>"
            return Version(self.peft_version.split("@")[0])
        except InvalidVersion:
            return None

    def rank_reason(self, key: str) -> str:
        """Where the rank of ``key`` comes from, for a message: "adapter_config.json says r=8"."""
        i = self._index("rank_pattern", key)
        name = self.path.name if self.path else CONFIG_NAME
        return f"{name} says r={self.r}" if i is None else f"{name} says rank_pattern {list(self.rank_pattern)[i]!r}: {self._patterns['rank_pattern'][1][i]}"

    def _lookup(self, name: str, key: str, default):
        i = self._index(name, key)
        return default if i is None else self._patterns[name][1][i]

    def _index(self, name: str, key: str) -> int | None:
        try:
            return self._patterns[name][0].first_match(key)
        except PatternError as e:
            raise AdapterError(self.path or CONFIG_NAME, name, e.expected, e.found) from None

    @classmethod
    def from_file(cls, path: str | Path) -> "PeftLoraConfig":
        """Read and check adapter_config.json: every field once, with its type and range."""
        path = Path(path)
        f = Fields(read_json_object(path), path)
        peft_type = f.string("peft_type", "LORA", max_len=64)
        if peft_type.upper() != "LORA":
            raise AdapterError(path, "peft_type", "LORA", repr(peft_type))
        for key in _UNSUPPORTED_TRUE:
            if f.boolean(key, False):
                raise AdapterError(path, key, "false (only plain LoRA is supported)", "true")
        if f.boolean("fan_in_fan_out", False):
            raise AdapterError(path, "fan_in_fan_out", "false", "true")
        return cls(
            r=f.integer("r", hi=MAX_RANK),
            lora_alpha=f.number("lora_alpha", hi=MAX_ALPHA),
            use_rslora=f.boolean("use_rslora", False),
            rank_pattern=f.mapping("rank_pattern", {}),
            alpha_pattern=f.mapping("alpha_pattern", {}),
            target_parameters=f.strings("target_parameters", ()),
            peft_version=f.string("peft_version", None, max_len=256),
            base_model=f.string("base_model_name_or_path", None),
            path=path,
        )


def _patterns(where, name: str, patterns, check, expected: str) -> tuple[PatternSet, tuple]:
    """PEFT's rule for one pattern table, compiled: the first pattern p with
    ``re.match(rf"(.*\\.)?({p})$", name)`` gives a module its value (linear_regex bounds the work)."""
    if not isinstance(patterns, dict):
        raise AdapterError(where, name, "a JSON object {pattern: value}", describe(patterns))
    if len(patterns) > _MAX_PATTERNS:
        raise AdapterError(where, name, f"at most {_MAX_PATTERNS} patterns", str(len(patterns)))
    for key, value in patterns.items():
        if not isinstance(key, str):
            raise AdapterError(where, name, "string patterns", describe(key))
        check(value, lambda: AdapterError(where, f"{name}.{key}", expected, describe(value)))
    try:
        matcher = PatternSet([rf"(.*\.)?({p})$" for p in patterns], shared_prefix=r"(.*\.)?")
    except PatternError as e:
        raise AdapterError(where, f"{name}.{list(patterns)[e.index]}", e.expected, e.found) from None
    return matcher, tuple(patterns.values())
