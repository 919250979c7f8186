"""The DeepSpeed JSON files a run starts from, one per ZeRO stage and one for the pipeline: only what
DeepSpeed alone needs. Shipped as package data (cromwell.ds_configs); pretrain/parallelize.py fills in
the fields the run config owns."""
