//! Duration strings (`30s`, `5m`, `2160h`, `90d`) as the reference stack writes them.

use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// Parses `30s`, `5m`, `2160h`, `90d`, `1h30m`; a bare number is refused because its unit
/// would be a guess.
pub fn parse(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim()).map_err(|e| {
        format!("expected a duration such as \"30s\", \"5m\" or \"2160h\", found {text:?} ({e})")
    })
}

/// Serde adapter for optional duration fields.
pub fn deserialize_opt<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let raw: Option<String> = Option::deserialize(d)?;
    raw.map(|s| parse(&s).map_err(serde::de::Error::custom))
        .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_reference_forms() {
        assert_eq!(parse("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse("2160h").unwrap(), Duration::from_secs(2160 * 3600));
        assert_eq!(parse("90d").unwrap(), Duration::from_secs(90 * 86400));
    }

    #[test]
    fn refuses_bare_numbers_and_garbage() {
        assert!(parse("30").unwrap_err().contains("expected a duration"));
        assert!(parse("soon").is_err());
    }
}
