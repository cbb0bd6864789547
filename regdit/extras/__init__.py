"""Around the pipeline: `regdit demo` (demo, with its classifier score), the run page (report) and
the sampling app (app)."""
