"""tgi-mp: a multiprocess, TGI-compatible LLM inference server."""
