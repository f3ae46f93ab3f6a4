//! When scheduled backups run: the original frequencies (hourly, daily,
//! weekly, monthly, with `Hour`, `Day`, `Month`) or a cron expression, all
//! turned into one cron schedule, evaluated in UTC.

use std::str::FromStr;

use chrono::{DateTime, Utc};
use croner::Cron;

#[derive(Debug, Clone)]
pub struct When {
    /// The cron expression this schedule is, for display.
    pub expr: String,
    cron: Cron,
}

impl PartialEq for When {
    fn eq(&self, other: &Self) -> bool {
        self.expr == other.expr
    }
}

/// (key, problem, fix) for a config error.
type WhenError = (&'static str, String, String);

fn weekday(v: &toml::Value) -> Result<u32, String> {
    match v {
        toml::Value::Integer(n) if (0..=6).contains(n) => Ok(*n as u32),
        toml::Value::String(s) => {
            let days = [
                "sunday",
                "monday",
                "tuesday",
                "wednesday",
                "thursday",
                "friday",
                "saturday",
            ];
            let l = s.to_ascii_lowercase();
            days.iter()
                .position(|d| *d == l || d[..3] == l)
                .map(|p| p as u32)
                .ok_or_else(|| format!("{s:?} is not a weekday"))
        }
        other => Err(format!("{other} is not a weekday")),
    }
}

impl When {
    /// From the original keys. `Frequency` may also be a cron expression.
    pub fn from_config(
        frequency: &str,
        hour: Option<&str>,
        day: Option<&toml::Value>,
        month: Option<u32>,
    ) -> Result<When, WhenError> {
        let (h, m) = match hour {
            None => (0, 0),
            Some(t) => {
                let parts: Vec<&str> = t.split(':').collect();
                let num = |s: &str, max: u32| s.parse::<u32>().ok().filter(|v| *v <= max);
                match parts.as_slice() {
                    [h, m] | [h, m, _] if num(h, 23).is_some() && num(m, 59).is_some() => {
                        (num(h, 23).unwrap_or(0), num(m, 59).unwrap_or(0))
                    }
                    _ => {
                        return Err((
                            "Hour",
                            format!("{t:?} is not a time of day"),
                            "write it as \"HH:MM:SS\", e.g. \"07:00:00\"".into(),
                        ));
                    }
                }
            }
        };
        let expr = match frequency.to_ascii_lowercase().as_str() {
            "hourly" => format!("{m} * * * *"),
            "daily" => format!("{m} {h} * * *"),
            "weekly" => {
                let d = match day {
                    None => 0,
                    Some(v) => weekday(v)
                        .map_err(|p| ("Day", p, "use a weekday name or 0 (Sunday) to 6".to_string()))?,
                };
                format!("{m} {h} * * {d}")
            }
            "monthly" => {
                let d = match day {
                    None => 1,
                    Some(toml::Value::Integer(n)) if (1..=31).contains(n) => *n as u32,
                    Some(v) => {
                        return Err((
                            "Day",
                            format!("{v} is not a day of the month"),
                            "use 1 to 31".into(),
                        ));
                    }
                };
                match month {
                    None => format!("{m} {h} {d} * *"),
                    Some(mo) if (1..=12).contains(&mo) => format!("{m} {h} {d} {mo} *"),
                    Some(mo) => return Err(("Month", format!("{mo} is not a month"), "use 1 to 12".into())),
                }
            }
            _ => frequency.to_string(),
        };
        When::cron(&expr).map_err(|e| {
            (
                "Frequency",
                format!("{frequency:?} is neither hourly, daily, weekly, monthly nor a valid cron expression ({e})"),
                "use one of the four words or a cron expression like \"30 2 * * 1-5\"".to_string(),
            )
        })
    }

    pub fn cron(expr: &str) -> Result<When, String> {
        let cron = Cron::from_str(expr).map_err(|e| e.to_string())?;
        Ok(When {
            expr: expr.to_string(),
            cron,
        })
    }

    /// The first time strictly after `t` when this schedule fires.
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.cron.find_next_occurrence(&t, false).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn frequencies_fire_when_the_config_says() {
        let t = at("2026-11-26T10:20:00Z"); // a Thursday
        let daily = When::from_config("daily", Some("07:00:00"), None, None).unwrap();
        assert_eq!(daily.next_after(t).unwrap(), at("2026-11-27T07:00:00Z"));
        let hourly = When::from_config("hourly", Some("00:15:00"), None, None).unwrap();
        assert_eq!(hourly.next_after(t).unwrap(), at("2026-11-26T11:15:00Z"));
        let weekly = When::from_config(
            "weekly",
            Some("23:30:00"),
            Some(&toml::Value::String("monday".into())),
            None,
        )
        .unwrap();
        assert_eq!(weekly.next_after(t).unwrap(), at("2026-11-30T23:30:00Z"));
        let monthly =
            When::from_config("monthly", Some("01:00:00"), Some(&toml::Value::Integer(1)), None).unwrap();
        assert_eq!(monthly.next_after(t).unwrap(), at("2026-12-01T01:00:00Z"));
        let cron = When::from_config("*/20 * * * *", None, None, None).unwrap();
        assert_eq!(cron.next_after(t).unwrap(), at("2026-11-26T10:40:00Z"));
        // Strictly after: a run at the exact time does not fire twice.
        assert_eq!(
            daily.next_after(at("2026-11-27T07:00:00Z")).unwrap(),
            at("2026-11-28T07:00:00Z")
        );
        let _ = Utc.timestamp_opt(0, 0);
    }

    #[test]
    fn bad_schedules_name_the_key() {
        assert_eq!(
            When::from_config("daily", Some("25:00"), None, None)
                .unwrap_err()
                .0,
            "Hour"
        );
        assert_eq!(
            When::from_config("weekly", None, Some(&toml::Value::String("funday".into())), None)
                .unwrap_err()
                .0,
            "Day"
        );
        assert_eq!(
            When::from_config("monthly", None, Some(&toml::Value::Integer(32)), None)
                .unwrap_err()
                .0,
            "Day"
        );
        assert_eq!(
            When::from_config("sometimes", None, None, None).unwrap_err().0,
            "Frequency"
        );
    }
}
