//! Change thresholds (`max_creates`, `max_disables`, `max_deletes`): a count or a percentage.
//!
//! A plan that would exceed a target's threshold holds the target until an operator releases
//! or discards it — the guard against an emptied HR table disabling everyone.

use serde_json::Value;
use std::fmt;

/// A limit on how many accounts one plan may change in one way.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Threshold {
    /// At most this many accounts (`50`).
    Count(u64),
    /// At most this share of the target's accounts, in percent (`'10%'` → `10.0`).
    Percent(f64),
}

/// Why a threshold option was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ThresholdError {
    /// Neither a number nor a string.
    #[error("threshold must be a whole number (50) or a percentage string ('10%'), not {0}")]
    WrongType(String),
    /// A count that is negative or fractional.
    #[error("threshold count must be a whole number of accounts, 0 or more, not {0}")]
    BadCount(String),
    /// A percentage outside 0–100 or not a number.
    #[error("threshold percentage must be a number from 0 to 100 followed by %, not \"{0}\"")]
    BadPercent(String),
}

impl Threshold {
    /// Reads a threshold from an option value: a JSON number (`50`), or a string holding a
    /// count (`"50"`) or a percentage (`"10%"`, `"2.5 %"`). `50.0` counts as 50.
    pub fn from_json(value: &Value) -> Result<Self, ThresholdError> {
        match value {
            Value::Number(n) => {
                if let Some(u) = n.as_u64() {
                    return Ok(Threshold::Count(u));
                }
                match n.as_f64() {
                    Some(f) if f >= 0.0 && f.fract() == 0.0 && f < u64::MAX as f64 => {
                        Ok(Threshold::Count(f as u64))
                    }
                    _ => Err(ThresholdError::BadCount(n.to_string())),
                }
            }
            Value::String(s) => s.parse(),
            Value::Null => Err(ThresholdError::WrongType("null".to_string())),
            Value::Bool(b) => Err(ThresholdError::WrongType(b.to_string())),
            Value::Array(_) => Err(ThresholdError::WrongType("an array".to_string())),
            Value::Object(_) => Err(ThresholdError::WrongType("an object".to_string())),
        }
    }

    /// Whether `planned` changes exceed the threshold for a target with `accounts` accounts.
    ///
    /// A count is exceeded when `planned > count`. A percentage is exceeded when `planned` is
    /// more than that share of `accounts`; with no accounts yet, any planned change exceeds a
    /// percentage (so a first full load into an empty target is held for an operator's release:
    /// use a count threshold, or none, when that is not wanted). `0` or `0%` holds any change.
    pub fn exceeded(&self, planned: u64, accounts: u64) -> bool {
        match *self {
            Threshold::Count(max) => planned > max,
            Threshold::Percent(p) => (planned as f64) * 100.0 > p * (accounts as f64),
        }
    }
}

impl std::str::FromStr for Threshold {
    type Err = ThresholdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        if let Some(num) = t.strip_suffix('%') {
            let num = num.trim_end();
            // Rust's f64 parser accepts "inf" and "NaN"; a threshold must be a plain number.
            let plain = !num.is_empty() && num.chars().all(|c| c.is_ascii_digit() || c == '.');
            return match num.parse::<f64>() {
                Ok(p) if plain && (0.0..=100.0).contains(&p) => Ok(Threshold::Percent(p)),
                _ => Err(ThresholdError::BadPercent(s.to_string())),
            };
        }
        if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) {
            return t
                .parse()
                .map(Threshold::Count)
                .map_err(|_| ThresholdError::BadCount(s.to_string()));
        }
        Err(ThresholdError::BadCount(format!("\"{s}\"")))
    }
}

impl fmt::Display for Threshold {
    /// The option form: `50` or `10%`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Threshold::Count(n) => write!(f, "{n}"),
            Threshold::Percent(p) => write!(f, "{p}%"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_counts_and_percentages() {
        assert_eq!(Threshold::from_json(&json!(50)), Ok(Threshold::Count(50)));
        assert_eq!(Threshold::from_json(&json!(50.0)), Ok(Threshold::Count(50)));
        assert_eq!(Threshold::from_json(&json!("50")), Ok(Threshold::Count(50)));
        assert_eq!(
            Threshold::from_json(&json!("10%")),
            Ok(Threshold::Percent(10.0))
        );
        assert_eq!(
            Threshold::from_json(&json!(" 2.5 % ")),
            Ok(Threshold::Percent(2.5))
        );
        assert_eq!(
            Threshold::from_json(&json!("0%")),
            Ok(Threshold::Percent(0.0))
        );
        assert_eq!(
            Threshold::from_json(&json!("100%")),
            Ok(Threshold::Percent(100.0))
        );
    }

    #[test]
    fn refuses_nonsense() {
        for bad in [
            json!(-1),
            json!(1.5),
            json!("-1"),
            json!("abc"),
            json!("101%"),
            json!("-5%"),
            json!("%"),
            json!("NaN%"),
            json!("inf%"),
            json!(""),
            json!(null),
            json!(true),
            json!([1]),
            json!({}),
        ] {
            let err = Threshold::from_json(&bad);
            assert!(err.is_err(), "{bad} accepted as {err:?}");
            let msg = err.unwrap_err().to_string();
            assert!(msg.starts_with("threshold"), "{msg}");
        }
    }

    #[test]
    fn exceeded() {
        assert!(!Threshold::Count(50).exceeded(50, 1000));
        assert!(Threshold::Count(50).exceeded(51, 1000));
        assert!(Threshold::Count(0).exceeded(1, 1000));
        assert!(!Threshold::Count(0).exceeded(0, 1000));
        let p = Threshold::Percent(10.0);
        assert!(!p.exceeded(100, 1000));
        assert!(p.exceeded(101, 1000));
        assert!(p.exceeded(1, 0));
        assert!(!p.exceeded(0, 0));
        assert!(!Threshold::Percent(100.0).exceeded(1000, 1000));
    }

    #[test]
    fn displays_as_option_text() {
        assert_eq!(Threshold::Count(5).to_string(), "5");
        assert_eq!(Threshold::Percent(2.5).to_string(), "2.5%");
        assert_eq!("10%".parse::<Threshold>(), Ok(Threshold::Percent(10.0)));
    }
}
