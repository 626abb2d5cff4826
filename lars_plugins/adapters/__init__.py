"""Every private attribute of another library that lars_plugins reads, one module per library.

Each private access is one named function here (``fsdp1.original_shapes`` reads a
``FlatParameter``'s ``_shapes``), and ``tests/test_adapters.py`` (with the distributed tests for
FSDP1 and DeepSpeed) calls each on real objects of the versions the extras allow, so a release
that moves one breaks one test with that function's name. Nothing outside this package reaches
into another library's private attributes. The modules import their library only inside the
functions that need it: ``import lars_plugins`` still needs torch alone.

* :mod:`.fsdp1`: ``FullyShardedDataParallel``'s flat parameters and their handles;
* :mod:`.deepspeed`: ZeRO-1/2 fragments and ZeRO-3 partitions;
* :mod:`.timm`: the optimizer registry ``create_optimizer_v2`` reads;
* :mod:`.lightning`: the Trainer's logging decision and step (``lightning`` or ``pytorch_lightning``);
* :mod:`.transformers`: the Trainer's optimizer names and its weight-decay split;
* :mod:`.dtensor`: torch's ``_StridedShard`` placement (FSDP2 over tensor parallelism);
* :mod:`.torchtitan`: how ``OptimizersContainer`` resolves an optimizer name;
* :mod:`.torch_optimizer`: the step hooks registered on a torch optimizer.
"""

__all__: list[str] = []  # the modules are the API: lars_plugins.adapters.fsdp1, ...
