"""Built-in quantization: ``quantize/dynamic-int8``, torch.ao dynamic quantization of Linear
layers (int8 weights, activations quantized on the fly). Its speed is measured, not assumed."""

from __future__ import annotations

from pydantic import Field

from compressflow import Stage, StageParams, StageResult, hookimpl


class DynamicInt8(Stage):
    """torch.ao ``quantize_dynamic`` on every Linear layer not excluded (fbgemm on x86)."""

    kind = "quantize"
    method = "dynamic-int8"
    default = True

    class Params(StageParams):
        exclude: list[str] = Field(default_factory=list, description="Linear layer-name patterns kept fp32")

    def run(self, model, ctx):
        from compressflow_quantize.dynamic import quantize_dynamic_int8

        quantized, names = quantize_dynamic_int8(model, self.params.exclude)
        return StageResult(quantized, metrics={"quantized_layers": len(names)},
                           notes=[f"int8 weights in {len(names)} Linear layers"])


@hookimpl
def register_stages(registry) -> None:
    """quantize/dynamic-int8."""
    registry.add(DynamicInt8)
