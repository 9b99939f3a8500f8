"""Everything that knows about DeepSpeed: the Rack as a PipelineModule, the stage-aware engine, the DeepSpeed JSON."""
