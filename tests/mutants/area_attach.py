"""Mutants of issue 23, attach(model): explicit caches win, one view per call in flight, detach restores plain
generate(), the attached cache's stats sum every view (tests/test_attach.py, tests/test_attach_clients.py)."""

from __future__ import annotations

from mutants.base import Mutant, replace_function

ATTACH = "tests/test_attach.py"
CLIENTS = "tests/test_attach_clients.py"


def attach_ignores_explicit_cache() -> None:
    """While attached, every call goes through the attachment's view, whatever cache it brought."""
    from hf_prefix_cache import generation
    from hf_prefix_cache.compat import CACHE_KWARGS

    def make(install):
        def install_routing_everything(model):
            install(model)
            wrapper = model.generate
            original = getattr(wrapper, generation._MARK)

            def generate(*args, **kwargs):
                attachment = model.__dict__.get(generation.ATTACHED)
                if attachment is None:
                    return wrapper(*args, **kwargs)
                kwargs = {k: v for k, v in kwargs.items() if k not in CACHE_KWARGS}
                return attachment.generate(original, args, kwargs)

            setattr(generate, generation._MARK, original)
            model.generate = generate

        return install_routing_everything

    replace_function("hf_prefix_cache.generation", "install", make)


def views_shared_between_threads() -> None:
    """One view serves every call, whichever thread makes it."""
    from hf_prefix_cache.views import ViewPool

    def one_view(self):
        with self._lock:
            if not self.views:
                self.views.append(self._make())
            return self.views[0]

    ViewPool.checkout = one_view
    ViewPool.checkin = lambda self, view: None


def detach_leaves_the_wrapper() -> None:
    """detach() drops the attachment but leaves the generate() wrapper it installed."""
    from hf_prefix_cache import attachment

    attachment.uninstall = lambda model: False


def detach_keeps_the_views() -> None:
    """detach() leaves the views (and their layer buffers) alive as long as the returned cache."""
    from hf_prefix_cache.views import ViewPool

    ViewPool.close = lambda self: None


def retired_views_uncounted() -> None:
    """The calls of views that detach() let go of vanish from the cache's stats."""
    from hf_prefix_cache.views import SummedCounters

    SummedCounters.retire = lambda self, view: None


def stale_model_gets_a_view() -> None:
    """A model cast after attach() still gets a view of the store (whose K/V no longer fit it)."""

    def make(leave_alone):
        def blind_to_casts(cache, args, kwargs):
            stale_reason = type(cache).stale_reason
            type(cache).stale_reason = lambda self: None
            try:
                return leave_alone(cache, args, kwargs)
            finally:
                type(cache).stale_reason = stale_reason

        return blind_to_casts

    replace_function("hf_prefix_cache.attachment", "leave_alone", make)


def reentered_call_gets_a_view() -> None:
    """A generate() started inside an attached call on the same thread goes through the store too."""
    from hf_prefix_cache.attachment import Attachment

    generate = Attachment.generate

    def forgetful(self, original, args, kwargs):
        self._local.active = False
        return generate(self, original, args, kwargs)

    Attachment.generate = forgetful


def use_cache_false_gets_a_view() -> None:
    """use_cache=False is not left alone: the view's fallback warns and recomputes."""

    def make(leave_alone):
        def serving_use_cache_false(cache, args, kwargs):
            if kwargs.get("use_cache") is False:
                return False
            return leave_alone(cache, args, kwargs)

        return serving_use_cache_false

    replace_function("hf_prefix_cache.attachment", "leave_alone", make)


def inputs_keyword_ignored() -> None:
    """A prompt passed as inputs= (smolagents) counts as no prompt: those calls run plain."""

    def make(leave_alone):
        def only_input_ids(cache, args, kwargs):
            if not args and "input_ids" not in kwargs:
                return True
            return leave_alone(cache, args, kwargs)

        return only_input_ids

    replace_function("hf_prefix_cache.attachment", "leave_alone", make)


def stats_of_one_view() -> None:
    """The attached cache's stats count only the calls made with it directly, not its views'."""
    from hf_prefix_cache.stats import Counters
    from hf_prefix_cache.views import SummedCounters

    SummedCounters.snapshot = Counters.snapshot


def reattach_keeps_the_first() -> None:
    """attach() on an attached model leaves the first attachment in place."""
    from hf_prefix_cache import attachment, generation

    attach = attachment.attach

    def keeps_first(model, **kwargs):
        first = model.__dict__.get(generation.ATTACHED)
        cache = attach(model, **kwargs)
        if first is not None:
            model.__dict__[generation.ATTACHED] = first
        return cache

    replace_function("hf_prefix_cache.attachment", "attach", lambda original: keeps_first)


MUTANTS = [
    Mutant(
        "attach_ignores_explicit_cache",
        "an explicit cache= / past_key_values= (a PrefixCache or a DynamicCache) wins over the attachment",
        attach_ignores_explicit_cache,
        (f"{ATTACH}::test_an_explicit_cache_wins",),
    ),
    Mutant(
        "attach_views_shared_between_threads",
        "each call in flight gets its own view of the attached store",
        views_shared_between_threads,
        (f"{ATTACH}::test_two_threads_at_once_each_get_a_view_and_stay_exact",),
    ),
    Mutant(
        "attach_detach_leaves_the_wrapper",
        "detach() removes the generate() wrapper that attach() installed",
        detach_leaves_the_wrapper,
        (f"{ATTACH}::test_detach_restores_plain_generate[False]",),
    ),
    Mutant(
        "attach_detach_keeps_the_views",
        "detach() lets go of every view of the attached store",
        detach_keeps_the_views,
        tuple(f"{ATTACH}::test_detach_restores_plain_generate[{before}]" for before in ("False", "True")),
    ),
    Mutant(
        "attach_retired_views_uncounted",
        "the stats of a detached cache keep the calls of its views",
        retired_views_uncounted,
        tuple(f"{ATTACH}::test_detach_restores_plain_generate[{before}]" for before in ("False", "True")),
    ),
    Mutant(
        "attach_stale_model_gets_a_view",
        "a model cast after attach() runs plain generate() with one warning",
        stale_model_gets_a_view,
        (f"{ATTACH}::test_a_model_cast_after_attach_runs_plain_with_one_warning",),
    ),
    Mutant(
        "attach_reentered_call_gets_a_view",
        "a generate() re-entered on the same thread during an attached call runs plain",
        reentered_call_gets_a_view,
        (f"{ATTACH}::test_a_generate_reentered_on_the_same_thread_runs_plain",),
    ),
    Mutant(
        "attach_use_cache_false_gets_a_view",
        "use_cache=False calls run plain generate() without a fallback warning",
        use_cache_false_gets_a_view,
        (f"{ATTACH}::test_calls_that_want_no_cache_run_plain",),
    ),
    Mutant(
        "attach_stats_of_one_view",
        "the attached cache's stats sum the calls of every view",
        stats_of_one_view,
        (
            f"{ATTACH}::test_plain_generate_through_attach_is_exact_and_hits_from_turn_two",
            f"{ATTACH}::test_two_threads_at_once_each_get_a_view_and_stay_exact",
        ),
    ),
    Mutant(
        "attach_reattach_keeps_the_first",
        "attaching again replaces the first attachment",
        reattach_keeps_the_first,
        (f"{ATTACH}::test_attaching_twice_replaces_the_first_with_one_warning",),
    ),
    Mutant(
        "attach_inputs_keyword_ignored",
        "a prompt passed as inputs= (smolagents' TransformersModel, both paths) goes through the store",
        inputs_keyword_ignored,
        (
            f"{CLIENTS}::test_smolagents_transformers_model_is_exact_attached[generate]",
            f"{CLIENTS}::test_smolagents_transformers_model_is_exact_attached[generate_stream]",
        ),
    ),
]
