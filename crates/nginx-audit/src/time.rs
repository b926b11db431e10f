//! `$time_local` (`10/Oct/2000:13:55:36 -0700`): ordered by the instant, shown in
//! RFC 3339 with the logged offset.

use std::fmt;

/// An instant as nginx logged it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Time {
    /// Seconds since 1970-01-01T00:00:00Z.
    pub unix: i64,
    /// The logged UTC offset, in minutes.
    pub offset_minutes: i16,
}

const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

impl Time {
    /// Parses `dd/Mon/yyyy:HH:MM:SS +hhmm`.
    pub fn parse_nginx(s: &str) -> Option<Time> {
        let b = s.as_bytes();
        if b.len() != 26 || b[2] != b'/' || b[6] != b'/' || b[11] != b':' || b[20] != b' ' {
            return None;
        }
        let num = |r: std::ops::Range<usize>| -> Option<i64> {
            let t = s.get(r)?;
            t.bytes()
                .all(|c| c.is_ascii_digit())
                .then(|| t.parse().ok())
                .flatten()
        };
        let day = num(0..2)?;
        let month = MONTHS.iter().position(|m| s.get(3..6) == Some(*m))? as i64 + 1;
        let year = num(7..11)?;
        let (h, mi, sec) = (num(12..14)?, num(15..17)?, num(18..20)?);
        if b[14] != b':'
            || b[17] != b':'
            || !(1..=31).contains(&day)
            || h > 23
            || mi > 59
            || sec > 60
        {
            return None;
        }
        let sign = match b[21] {
            b'+' => 1,
            b'-' => -1,
            _ => return None,
        };
        let (oh, om) = (num(22..24)?, num(24..26)?);
        if om > 59 {
            return None;
        }
        let offset = sign * (oh * 60 + om);
        let local = days_from_civil(year, month, day) * 86_400 + h * 3600 + mi * 60 + sec;
        Some(Time {
            unix: local - offset * 60,
            offset_minutes: i16::try_from(offset).ok()?,
        })
    }
}

impl fmt::Display for Time {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let off = i64::from(self.offset_minutes);
        let local = self.unix + off * 60;
        let (y, m, d) = civil_from_days(local.div_euclid(86_400));
        let s = local.rem_euclid(86_400);
        let sign = if off < 0 { '-' } else { '+' };
        write!(
            f,
            "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}{sign}{:02}:{:02}",
            s / 3600,
            s / 60 % 60,
            s % 60,
            off.abs() / 60,
            off.abs() % 60
        )
    }
}

impl serde::Serialize for Time {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (
        if m <= 2 {
            yoe + era * 400 + 1
        } else {
            yoe + era * 400
        },
        m,
        d,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_orders_across_offsets() {
        let a = Time::parse_nginx("10/Oct/2000:13:55:36 -0700").unwrap();
        assert_eq!(a.unix, 971_211_336);
        assert_eq!(a.to_string(), "2000-10-10T13:55:36-07:00");
        let b = Time::parse_nginx("10/Oct/2000:20:55:36 +0000").unwrap();
        assert_eq!(a.unix, b.unix);
        let leap = Time::parse_nginx("29/Feb/2024:00:00:00 +0100").unwrap();
        assert_eq!(leap.to_string(), "2024-02-29T00:00:00+01:00");
        assert!(Time::parse_nginx("10/Oct/2000:13:55:36").is_none());
        assert!(Time::parse_nginx("10/Okt/2000:13:55:36 -0700").is_none());
        assert!(Time::parse_nginx("10/Oct/2000:25:55:36 -0700").is_none());
    }
}
