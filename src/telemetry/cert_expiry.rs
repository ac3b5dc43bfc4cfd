//! The server certificate's notAfter, for STATUS and `/metrics`. A minimal DER walk over the
//! fields before `validity`, so that no X.509 parser enters the dependency tree for one date.

use time::{Date, Month, OffsetDateTime, PrimitiveDateTime, Time};

/// Reads one DER TLV at `pos`: (tag, content start, content end).
fn tlv(der: &[u8], pos: usize) -> Option<(u8, usize, usize)> {
    let tag = *der.get(pos)?;
    let first = *der.get(pos + 1)? as usize;
    let (len, start) = if first < 0x80 {
        (first, pos + 2)
    } else {
        let n = first & 0x7f;
        if n == 0 || n > 4 {
            return None;
        }
        let mut len = 0usize;
        for i in 0..n {
            len = (len << 8) | *der.get(pos + 2 + i)? as usize;
        }
        (len, pos + 2 + n)
    };
    let end = start.checked_add(len)?;
    (end <= der.len()).then_some((tag, start, end))
}

/// notAfter of a DER certificate.
pub fn not_after(der: &[u8]) -> Option<OffsetDateTime> {
    let (_, cert, _) = tlv(der, 0)?; // Certificate SEQUENCE
    let (_, tbs, _) = tlv(der, cert)?; // tbsCertificate SEQUENCE
    let mut pos = tbs;
    let (tag, _, end) = tlv(der, pos)?;
    if tag == 0xa0 {
        pos = end; // [0] version
    }
    for _ in 0..3 {
        pos = tlv(der, pos)?.2; // serial, signature, issuer
    }
    let (_, validity, _) = tlv(der, pos)?;
    let (_, _, nb_end) = tlv(der, validity)?;
    let (tag, s, e) = tlv(der, nb_end)?;
    parse_time(tag, std::str::from_utf8(&der[s..e]).ok()?)
}

fn parse_time(tag: u8, t: &str) -> Option<OffsetDateTime> {
    let t = t.strip_suffix('Z')?;
    let (year, rest) = match tag {
        0x17 => {
            let yy: i32 = t.get(0..2)?.parse().ok()?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, t.get(2..)?)
        }
        0x18 => (t.get(0..4)?.parse().ok()?, t.get(4..)?),
        _ => return None,
    };
    let n = |r: std::ops::Range<usize>| rest.get(r)?.parse::<u8>().ok();
    let date = Date::from_calendar_date(year, Month::try_from(n(0..2)?).ok()?, n(2..4)?).ok()?;
    let time = Time::from_hms(n(4..6)?, n(6..8)?, n(8..10)?).ok()?;
    Some(PrimitiveDateTime::new(date, time).assume_utc())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_not_after_of_an_issued_certificate() {
        let pki = crate::certs::issue::generate(
            "t.example",
            crate::certs::issue::CA_VALIDITY,
            std::time::Duration::from_secs(90 * 86400),
        )
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        pki.write_to(dir.path()).unwrap();
        let certs = crate::certs::load_certs("tls.cert_file", &dir.path().join("tls.crt")).unwrap();
        let na = not_after(&certs[0]).unwrap();
        let days = (na - OffsetDateTime::now_utc()).whole_days();
        assert!((88..=90).contains(&days), "{days}");
        assert!(not_after(b"\x30\x03\x02\x01\x00").is_none());
    }
}
