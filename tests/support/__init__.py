"""Helpers of the test suite, imported as ``support.<module>`` (tests/ is on sys.path, see conftest.py).

- ``models``: the one tiny-model factory (``tiny_model``, memoised as ``model_for``) and a char tokenizer.
- ``exact``: greedy generate() with and without a cache, compared; prefill recording; misuse checks.
- ``assertions``: the exactness suite's tolerances, ``assert_exact`` and the beam comparison.
- ``calls``: one compared call (no cache, then the cache), recording what each forward was fed.
- ``oracle``: which prefixes the store should hold, and the check that a call reused exactly those.
- ``scenarios``: generate() strategies, prompts and the multi-call scenarios of the matrix.
- ``chat``: the eval harness's ChatML tokenizer and the tiny Llama sized for it.
- ``tiers``: a small store layout, synthetic blocks and tier namespaces for the tier tests.
- ``redis_server``: a real redis-server child process; ``workers``: the worker scripts
  (``tier_worker.py``, ``remote_worker.py``) started as fresh interpreters.
"""
