"""The caching runtime: step context, FULL/CACHED schedule, FLOPs cost model, hooks."""
