"""What each step of a run does, one module a step: start (API), extract, generate, attach, and record a
failure, over the shared machinery in ``machinery``.

Each step takes its input contract and a ``StepDeps`` of ports, and returns its output contract. They hold
the rules that make a run safe to retry: a stored image is never generated again, an upload or attachment
already made is never made again, and every end leaves a readable state.
"""
