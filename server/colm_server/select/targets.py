"""Which weights a per-sample gradient sketch covers."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class SketchTarget:
    """A linear module whose ``weight`` is sketched; its gradient is flattened row-major."""

    name: str
    module: nn.Linear

    @property
    def numel(self) -> int:
        return self.module.weight.numel()


def _is_lora(name: str) -> bool:
    parts = name.split(".")
    return "lora_A" in parts or "lora_B" in parts


def sketch_targets(layers: list[nn.Module], *, params: str, probe_module: str) -> list[SketchTarget]:
    """The sketched linear maps inside `layers`.

    ``params="probe"``: the LoRA B of each ``probe_module`` (its plain weight without LoRA).
    ``params="adapter"``: every LoRA A and B matrix (the probe's weight without LoRA).
    """
    named = [(f"top{i}.{n}", m) for i, layer in enumerate(layers) for n, m in layer.named_modules()]
    lora = [SketchTarget(n, m) for n, m in named if isinstance(m, nn.Linear) and _is_lora(n)]
    if lora and params == "adapter":
        return lora
    probes = [(n, m) for n, m in named if n.rsplit(".", 1)[-1] == probe_module]
    if not probes:
        raise ValueError(f"probe_module {probe_module!r} not found in the sketched layers")
    targets = []
    for name, module in probes:
        if lora:
            targets += [t for t in lora if t.name.startswith(f"{name}.lora_B.")]
        else:
            base = getattr(module, "base_layer", module)
            if not isinstance(base, nn.Linear):
                raise ValueError(f"probe_module {probe_module!r} is not a linear map")
            targets.append(SketchTarget(name, base))
    return targets
