from proxy_agent.throttle import TokenBucket
from tests.support.clock import Clock


def test_bucket_holds_the_rate_over_time() -> None:
    clock = Clock()
    bucket = TokenBucket(rate=1000.0, burst=100.0, clock=clock.seconds)
    sent = 0
    # Send 100-byte messages as fast as the bucket lets us for 10 simulated seconds.
    while clock.seconds() < 10.0:
        clock.advance(bucket.delay(100))
        sent += 100
    assert abs(sent - 10_000) <= 200  # the burst plus one message


def test_no_delay_within_the_burst_and_refill() -> None:
    clock = Clock()
    bucket = TokenBucket(rate=10.0, burst=50.0, clock=clock.seconds)
    assert bucket.delay(50) == 0.0
    assert bucket.delay(10) == 1.0
    clock.advance(10.0)
    assert bucket.delay(40) == 0.0
