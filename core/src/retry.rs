//! The retry policy, in one place for every connector: which failures are transient
//! ([`is_transient_status`] for HTTP, [`is_transient_sqlstate`] for table targets), and when the
//! next attempt is due ([`retry_delay`]: capped exponential backoff with full jitter, honouring
//! `Retry-After`). The worker's ledger calls these for HTTP outcomes, and SQL reaches the same
//! functions through `identity_sync._retry_delay` and `identity_sync._is_transient_sqlstate`.
//!
//! Full jitter (a uniform delay between zero and the exponential ceiling) spreads the retries
//! of many events that failed together, so a target that was down is not hit by all of them at
//! the same instant when it comes back.

use rand::Rng;
use std::time::{Duration, SystemTime};

/// No retry is ever scheduled further out than this, whatever the configured cap or a
/// target's `Retry-After` say: a target asking for a day's pause still gets a retry within the
/// hour, so an operator sees it recover without a manual `retry`.
pub const MAX_RETRY_DELAY: Duration = Duration::from_secs(3600);

/// The first retry waits up to this long (the exponential ceiling's base).
pub const RETRY_BASE: Duration = Duration::from_millis(500);

/// The exponential ceiling stops growing here (before a target's `Retry-After`).
pub const RETRY_CAP: Duration = Duration::from_secs(300);

/// An HTTP status worth another try: 408 (request timeout), 429 (too many requests) and every
/// 5xx. Anything else a caller did not handle needs an operator.
pub fn is_transient_status(status: u16) -> bool {
    status == 408 || status == 429 || status >= 500
}

/// A PostgreSQL error (by SQLSTATE) worth another try when applying an event to a table
/// target: connection failures (class 08, a postgres_fdw server that is down), transaction
/// rollbacks such as deadlocks and serialization failures (40), insufficient resources (53),
/// operator intervention such as a shutdown (57), and a lock not available (55P03). Constraint
/// or type errors (and everything else) need an operator.
pub fn is_transient_sqlstate(sqlstate: &str) -> bool {
    matches!(sqlstate.get(..2), Some("08" | "40" | "53" | "57")) || sqlstate == "55P03"
}

/// The delay before the next attempt.
///
/// `attempt` is the number of attempts already failed (1 after the first failure; 0 is
/// treated as 1). The exponential ceiling is `base × 2^(attempt−1)`, limited to `cap`; the
/// delay is drawn uniformly from `[0, ceiling]` with `rng` (seed it for reproducible tests).
/// A `retry_after` from the target wins when it is larger. The result never exceeds
/// [`MAX_RETRY_DELAY`].
pub fn retry_delay<R: Rng + ?Sized>(
    attempt: u32,
    base: Duration,
    cap: Duration,
    retry_after: Option<Duration>,
    rng: &mut R,
) -> Duration {
    let cap = cap.min(MAX_RETRY_DELAY);
    let exponent = attempt.max(1) - 1;
    // 2^exponent overflows quickly; checked arithmetic keeps it at the cap instead.
    let ceiling = 2u32
        .checked_pow(exponent.min(31))
        .and_then(|factor| base.checked_mul(factor))
        .map_or(cap, |d| d.min(cap));
    let ceiling_ms = u64::try_from(ceiling.as_millis()).unwrap_or(u64::MAX);
    let jittered = Duration::from_millis(rng.random_range(0..=ceiling_ms));
    let delay = match retry_after {
        Some(ra) if ra > jittered => ra,
        _ => jittered,
    };
    delay.min(MAX_RETRY_DELAY)
}

/// Parses an HTTP `Retry-After` value: delay-seconds (`120`) or an HTTP-date
/// (`Wed, 21 Oct 2015 07:28:00 GMT`), relative to `now`. A date in the past gives zero;
/// anything else that is not valid gives `None`.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        // A huge number of seconds saturates rather than failing: it still means "later".
        return Some(Duration::from_secs(
            value.parse::<u64>().unwrap_or(u64::MAX),
        ));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    #[test]
    fn transient_classification() {
        for s in [408, 429, 500, 502, 503, 599] {
            assert!(super::is_transient_status(s), "{s}");
        }
        for s in [200, 302, 400, 401, 403, 404, 409, 422] {
            assert!(!super::is_transient_status(s), "{s}");
        }
        for c in [
            "08006", "08001", "40001", "40P01", "53100", "57P01", "55P03",
        ] {
            assert!(super::is_transient_sqlstate(c), "{c}");
        }
        for c in ["23505", "22P02", "42703", "55000", "", "4"] {
            assert!(!super::is_transient_sqlstate(c), "{c}");
        }
    }

    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn grows_exponentially_within_the_cap() {
        let mut rng = StdRng::seed_from_u64(7);
        for attempt in 0..70 {
            let ceiling = S
                .saturating_mul(1 << (attempt.max(1) - 1).min(20))
                .min(60 * S);
            for _ in 0..50 {
                let d = retry_delay(attempt, S, 60 * S, None, &mut rng);
                assert!(d <= ceiling, "attempt {attempt}: {d:?} > {ceiling:?}");
            }
        }
        // Jitter actually varies, and over many draws reaches near the ceiling.
        let draws: Vec<_> = (0..200)
            .map(|_| retry_delay(5, S, 60 * S, None, &mut rng))
            .collect();
        assert!(draws.iter().any(|d| *d > 12 * S));
        assert!(draws.iter().any(|d| *d < 4 * S));
    }

    #[test]
    fn deterministic_under_a_seed() {
        let a: Vec<_> = {
            let mut rng = StdRng::seed_from_u64(42);
            (1..10)
                .map(|n| retry_delay(n, S, 300 * S, None, &mut rng))
                .collect()
        };
        let b: Vec<_> = {
            let mut rng = StdRng::seed_from_u64(42);
            (1..10)
                .map(|n| retry_delay(n, S, 300 * S, None, &mut rng))
                .collect()
        };
        assert_eq!(a, b);
    }

    #[test]
    fn retry_after_wins_when_larger_and_everything_is_capped() {
        let mut rng = StdRng::seed_from_u64(1);
        assert_eq!(retry_delay(1, S, 60 * S, Some(30 * S), &mut rng), 30 * S);
        let d = retry_delay(30, S, 60 * S, Some(2 * S), &mut rng);
        assert!(d >= 2 * S && d <= 60 * S);
        assert_eq!(
            retry_delay(1, S, 60 * S, Some(86_400 * S), &mut rng),
            MAX_RETRY_DELAY
        );
        assert!(
            retry_delay(u32::MAX, Duration::MAX, Duration::MAX, None, &mut rng) <= MAX_RETRY_DELAY
        );
        assert_eq!(
            retry_delay(3, Duration::ZERO, 60 * S, None, &mut rng),
            Duration::ZERO
        );
    }

    #[test]
    fn parses_retry_after() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_445_412_480); // 2015-10-21 07:28:00
        assert_eq!(parse_retry_after("120", now), Some(120 * S));
        assert_eq!(parse_retry_after(" 0 ", now), Some(Duration::ZERO));
        assert_eq!(
            parse_retry_after("99999999999999999999999", now),
            Some(Duration::from_secs(u64::MAX))
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:29:00 GMT", now),
            Some(60 * S)
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        for bad in ["", "-5", "1.5", "soon", "Wed, 21 Oct 2015"] {
            assert_eq!(parse_retry_after(bad, now), None, "{bad:?}");
        }
    }
}
