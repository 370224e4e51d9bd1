from proxy_agent.verify import choose_sample, unsent_blocks
from vmrepl.extent import Extent

BS = 10


def test_unsent_blocks_are_whole_blocks_outside_what_was_sent() -> None:
    sent = [Extent(0, 10), Extent(25, 10)]  # touches blocks 0, 2 and 3
    got = list(unsent_blocks(sent, disk_size=75, block_size=BS))
    assert got == [Extent(10, 10), Extent(40, 10), Extent(50, 10), Extent(60, 10), Extent(70, 5)]


def test_sample_takes_the_start_and_a_random_rest() -> None:
    candidates = [Extent(i * BS, BS) for i in range(5000)]
    sample = choose_sample(candidates, disk_blocks=20_000, seed="t")
    assert len(sample) == 20  # 0.1% of 20,000 blocks
    assert sample[:10] == candidates[:10]
    assert len(set(sample)) == 20 and sample == sorted(sample, key=lambda e: e.offset)
    assert choose_sample(candidates, disk_blocks=20_000, seed="t") == sample  # reproducible per transfer


def test_sample_has_at_least_16_blocks_and_never_more_than_exist() -> None:
    candidates = [Extent(i * BS, BS) for i in range(100)]
    assert len(choose_sample(candidates, disk_blocks=100, seed="x")) == 16
    assert len(choose_sample(candidates[:5], disk_blocks=100, seed="x")) == 5
