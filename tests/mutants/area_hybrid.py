"""Mutants of issue 22, hybrid models: recurrent-state snapshots taken at the right position, per row, in
their namespace, within their budget, reordered with the beams (tests/test_hybrid.py)."""

from __future__ import annotations

from mutants.base import mutant, replace_function

HYBRID = "tests/test_hybrid.py"
FAMILY = f"{HYBRID}::test_family_is_exact_and_hits_the_whole_history"


@mutant(
    "snapshot_from_the_wrong_position",
    breaks="the state at the end of a reply is taken exactly at the block boundary it is stored under",
    tests=(f"{FAMILY}[qwen3_5_text]", f"{FAMILY}[bamba]", f"{FAMILY}[falcon_h1]"),
)
def snapshot_from_the_wrong_position() -> None:
    def make(reply_states):
        def one_token_short(model, make_layers, layers, call, prompt_end, tokens, size):
            pending = reply_states(model, make_layers, layers, call, prompt_end, tokens, size)
            if pending is None or pending.tokens - 1 <= prompt_end.tokens:
                return pending
            short = reply_states(
                model, make_layers, layers, call, prompt_end, tokens[: pending.tokens - 1], 1
            )
            short.tokens = pending.tokens  # stored under the boundary, holding one token less
            return short

        return one_token_short

    replace_function("hf_prefix_cache.checkpoints", "reply_states", make)


@mutant(
    "beam_reorder_skips_recurrent_state",
    breaks="beam search reorders the recurrent states with the K/V",
    tests=(
        f"{HYBRID}::test_decoding_strategies_are_exact_with_hits[qwen3_5_text-beam3_n2]",
        f"{HYBRID}::test_decoding_strategies_are_exact_with_hits[falcon_h1-beam3_n2]",
    ),
)
def beam_reorder_skips_recurrent_state() -> None:
    from hf_prefix_cache.layers import PrefixFullLayer
    from hf_prefix_cache.state_layers import PrefixHybridLayer, PrefixStateLayer

    PrefixStateLayer.reorder_cache = lambda self, beam_idx: None
    PrefixHybridLayer.reorder_cache = lambda self, beam_idx: PrefixFullLayer.reorder_cache(self, beam_idx)


@mutant(
    "snapshot_not_in_the_namespace",
    breaks="a snapshot is found through its chain's block (namespace, prefix), not by the tokens it ends on",
    tests=(f"{HYBRID}::test_snapshots_of_another_model_sharing_the_store_are_never_restored",),
)
def snapshot_not_in_the_namespace() -> None:
    from hf_prefix_cache.snapshots import SnapshotStore

    put, get = SnapshotStore.put, SnapshotStore.get
    by_tokens: dict = {}

    def put_by_tokens(self, block, tokens, layers):
        stored = put(self, block, tokens, layers)
        if stored:
            by_tokens[block.key[1]] = self.entries[block.block_hash]
        return stored

    def get_by_tokens(self, block):
        found = get(self, block)
        if found is None and block.key is not None:
            found = by_tokens.get(block.key[1])
        return found

    SnapshotStore.put, SnapshotStore.get = put_by_tokens, get_by_tokens


@mutant(
    "rows_share_one_state",
    breaks="each row of a batch restarts from its own snapshot",
    tests=(f"{HYBRID}::test_rows_that_hit_at_different_snapshots_each_get_their_own_state",),
)
def rows_share_one_state() -> None:
    from hf_prefix_cache.checkpoints import ComputedPrefix

    states = ComputedPrefix.states

    def first_row_state(self, index):
        found = states(self, index)
        return [found[0]] * len(found)

    ComputedPrefix.states = first_row_state


@mutant(
    "snapshot_memory_unbounded",
    breaks="snapshots stay within snapshot_memory, least recently used out first",
    tests=(f"{HYBRID}::test_snapshot_memory_is_bounded_and_evicts_least_recently_used",),
)
def snapshot_memory_unbounded() -> None:
    from hf_prefix_cache.snapshots import SnapshotStore

    init = SnapshotStore.__init__

    def unbounded(self, budget):
        init(self, 1 << 40)

    SnapshotStore.__init__ = unbounded


@mutant(
    "snapshot_ladder_off",
    breaks="snapshot_every keeps states inside long prompts, so a shared prefix hits under other turns",
    tests=(f"{HYBRID}::test_ladder_snapshots_let_a_shared_prefix_hit_under_other_turns",),
)
def snapshot_ladder_off() -> None:
    def make(snapshot_positions):
        return lambda start, end, size, every: snapshot_positions(start, end, size, None)

    replace_function("hf_prefix_cache.checkpoints", "snapshot_positions", make)


@mutant(
    "hybrid_states_not_restored",
    breaks="a hit on a hybrid model restores the recurrent states of its snapshot",
    tests=(
        f"{FAMILY}[lfm2]",
        f"{FAMILY}[nemotron_h]",
        f"{FAMILY}[zamba2]",
        f"{HYBRID}::test_bf16_hybrids_are_exact_under_the_low_precision_rule[bamba]",
        f"{HYBRID}::test_a_batch_row_with_a_single_token_starts_fresh_beside_rows_that_hit",
    ),
)
def hybrid_states_not_restored() -> None:
    from hf_prefix_cache.state_layers import StateMixin

    load = StateMixin.load_states

    def zeros(self, rows, length):
        load(self, rows, length)
        for index in range(self.number_of_states):
            for state in (self.conv_states[index], self.recurrent_states[index]):
                if state is not None:
                    state.zero_()

    StateMixin.load_states = zeros


@mutant(
    "tiers_drop_states",
    breaks="the host, disk and remote tiers keep the snapshots of hybrid models beside their blocks",
    tests=(
        f"{HYBRID}::test_snapshots_are_kept_by_the_tiers_and_promoted_back[host]",
        f"{HYBRID}::test_snapshots_are_kept_by_the_tiers_and_promoted_back[disk]",
        f"{HYBRID}::test_a_new_process_resumes_from_the_disk_snapshots",
        f"{HYBRID}::test_a_second_process_resumes_from_the_remote_snapshots",
    ),
)
def tiers_drop_states() -> None:
    from hf_prefix_cache.tiering import TierStack

    TierStack.put_state = lambda self, *args, **kwargs: None


@mutant(
    "state_entry_unverified",
    breaks="a state entry read from a shared tier is verified (checksum or MAC) before it is restored",
    tests=(f"{HYBRID}::test_a_tampered_state_entry_is_a_counted_miss_never_a_wrong_state",),
)
def state_entry_unverified() -> None:
    from hf_prefix_cache.tiers import state_entry

    def make(decode_state):
        def trusting(data, namespace, block_hash, layouts, key=None):
            view = bytearray(data)  # re-sealed with whatever it holds: the reader trusts the bytes
            view[state_entry._CHECKSUM_AT : state_entry.STATE_HEADER.size] = state_entry._NO_CHECKSUM
            at = state_entry.STATE_HEADER.size
            seal = state_entry._seal([bytes(view[:at]), bytes(view[at:])], key)
            view[state_entry._CHECKSUM_AT : at] = seal
            return decode_state(bytes(view), namespace, block_hash, layouts, key)

        return trusting

    replace_function("hf_prefix_cache.tiers.state_entry", "decode_state", make)


@mutant(
    "explain_ignores_snapshots",
    breaks="explain() reports the hit a hybrid model's call gets: up to its longest snapshot",
    tests=(f"{HYBRID}::test_explain_reports_the_hit_up_to_the_longest_snapshot",),
)
def explain_ignores_snapshots() -> None:
    from hf_prefix_cache.snapshots import SnapshotStore

    SnapshotStore.peek = lambda self, block: True
