"""Framework integrations of ssdoffload, installed as ``ssdoffload.integrations``.

One module per framework; importing this package imports none of them (nor the framework),
so ``import ssdoffload`` stays light:

* ``ssdoffload.integrations.deepspeed`` — an ``"ssd_offload"`` block in the DeepSpeed JSON
  config, read by ``initialize(...)`` (same arguments and results as ``deepspeed.initialize``);
  covers ``DeepSpeedEngine`` (ZeRO 0/1/2, bf16, gradient accumulation) and ``PipelineEngine``
  (1F1B ``TrainSchedule``, activation checkpointing). Example: ``integrations/examples/deepspeed/``.
* ``ssdoffload.integrations.megatron`` — Megatron-core pipeline schedules.
* ``ssdoffload.integrations.huggingface`` — ``SSDOffloadCallback`` for the ``transformers.Trainer``.
* ``ssdoffload.integrations.accelerate`` — ``offload_activations(accelerator, model, ...)``.
* ``ssdoffload.integrations.lightning`` — ``SSDOffloadCallback`` for ``lightning.Trainer``.
"""

__all__ = ["deepspeed", "megatron", "huggingface", "accelerate", "lightning"]
