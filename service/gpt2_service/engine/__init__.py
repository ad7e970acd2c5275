"""The batched inference engine: the asyncio front end (``frontend.Engine``), the engine thread's
loop, the runner and sampler that do a step's tensor work, streams and the events metrics read."""
