"""KOALA distillation training. `loop.train` shows the data flow (data -> teacher & student -> losses ->
update -> checkpoint); `setup` builds what a run needs; `step`, `losses`, `noise`, `sharding`, `state`,
`checkpoint`, `metrics` and `preview` are the pieces it calls; `config` holds every option's default;
`plan` compiles the same step from abstract inputs to report its memory per device (`--config.plan.enabled=True`)."""
