//! Server-sent events, split as they stream: bytes in, complete events out.
//!
//! Follows the WHATWG event-stream rules the MCP SDKs implement: lines end with CRLF, LF or
//! CR; a blank line ends an event; `data` lines are joined with `\n`; a comment line starts
//! with `:`. Memory is bounded: an event longer than `max_event` bytes is not kept (its
//! bytes are handed on as they come, marked as not inspected).

/// A complete event.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Event {
    /// The event's bytes as received, up to and including the blank line that ended it
    /// (empty unless the reader keeps raw bytes).
    pub raw: Vec<u8>,
    /// Its `data` lines joined with `\n`.
    pub data: Vec<u8>,
    /// At least one `data` line.
    pub has_data: bool,
}

/// What the reader hands back, in stream order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    /// A complete event, small enough to inspect.
    Event(Event),
    /// Bytes of an event too long to inspect: with raw bytes kept, to be passed on as they
    /// are (an event may come in several pieces; `first` marks its first); without, empty:
    /// one marker per skipped event.
    Uninspected { bytes: Vec<u8>, first: bool },
}

/// Incremental event-stream reader.
#[derive(Debug)]
pub struct Reader {
    max_event: usize,
    keep_raw: bool,
    raw: Vec<u8>,
    line: Vec<u8>,
    /// Bytes of the current line (also counted while skipping, when `line` stays empty).
    line_len: usize,
    data: Vec<u8>,
    has_data: bool,
    /// Bytes of the current event so far.
    event_len: usize,
    /// The current event went over `max_event`: skip to its end.
    skipping: bool,
    /// The last byte seen was a CR (a following LF belongs to the same line end).
    after_cr: bool,
}

impl Reader {
    /// `keep_raw`: keep each event's bytes so that the caller can pass them on (or a
    /// rewritten version) event by event; without it the caller forwards the bytes itself
    /// and only reads the events.
    pub fn new(max_event: usize, keep_raw: bool) -> Reader {
        Reader {
            max_event,
            keep_raw,
            raw: Vec::new(),
            line: Vec::new(),
            line_len: 0,
            data: Vec::new(),
            has_data: false,
            event_len: 0,
            skipping: false,
            after_cr: false,
        }
    }

    /// Bytes of an unfinished event held back (with `keep_raw`).
    pub fn pending(&self) -> &[u8] {
        &self.raw
    }

    /// Takes the bytes of an unfinished event (at the end of the stream).
    pub fn take_pending(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.raw)
    }

    /// Feeds `chunk`; appends what completed to `out`.
    pub fn push(&mut self, chunk: &[u8], out: &mut Vec<Piece>) {
        let mut start = 0; // first byte of `chunk` not yet in `raw` or `out`
        for (pos, &b) in chunk.iter().enumerate() {
            let i = pos + 1;
            self.event_len += 1;
            if self.after_cr && b == b'\n' {
                // The LF of a CRLF: the line already ended at the CR.
                self.after_cr = false;
            } else if b != b'\n' && b != b'\r' {
                self.after_cr = false;
                self.line_len += 1;
                if !self.skipping {
                    self.line.push(b);
                }
            } else if self.line_len > 0 {
                self.after_cr = b == b'\r';
                if !self.skipping {
                    self.field();
                }
                self.line.clear();
                self.line_len = 0;
            } else {
                // A blank line: the event ends here.
                self.after_cr = b == b'\r';
                if self.skipping {
                    if self.keep_raw {
                        out.push(Piece::Uninspected {
                            bytes: chunk[start..i].to_vec(),
                            first: false,
                        });
                    }
                    self.skipping = false;
                } else {
                    let mut raw = std::mem::take(&mut self.raw);
                    if self.keep_raw {
                        raw.extend_from_slice(&chunk[start..i]);
                    }
                    if self.data.last() == Some(&b'\n') {
                        self.data.pop();
                    }
                    out.push(Piece::Event(Event {
                        raw,
                        data: std::mem::take(&mut self.data),
                        has_data: self.has_data,
                    }));
                }
                start = i;
                self.has_data = false;
                self.event_len = 0;
                continue;
            }
            if !self.skipping && self.event_len > self.max_event {
                self.start_skipping(&chunk[start..i], out);
                start = i;
            }
        }
        // The rest of the chunk belongs to the current, unfinished event.
        if self.keep_raw && start < chunk.len() {
            if self.skipping {
                out.push(Piece::Uninspected {
                    bytes: chunk[start..].to_vec(),
                    first: false,
                });
            } else {
                self.raw.extend_from_slice(&chunk[start..]);
            }
        }
    }

    fn start_skipping(&mut self, held: &[u8], out: &mut Vec<Piece>) {
        self.skipping = true;
        if self.keep_raw {
            let mut bytes = std::mem::take(&mut self.raw);
            bytes.extend_from_slice(held);
            out.push(Piece::Uninspected { bytes, first: true });
        } else {
            out.push(Piece::Uninspected {
                bytes: Vec::new(),
                first: true,
            });
        }
        self.data = Vec::new();
        self.line = Vec::new();
        self.has_data = false;
    }

    /// Applies the line in `self.line` (not empty) to the current event.
    fn field(&mut self) {
        let line = &self.line;
        let (name, value) = match line.iter().position(|&b| b == b':') {
            Some(0) => return, // comment
            Some(p) => {
                let v = &line[p + 1..];
                (&line[..p], v.strip_prefix(b" ").unwrap_or(v))
            }
            None => (&line[..], &b""[..]),
        };
        if name == b"data" {
            self.data.extend_from_slice(value);
            self.data.push(b'\n');
            self.has_data = true;
        }
    }
}

/// `raw` (one complete event) with its `data` lines replaced by one line carrying `data`
/// (which must not contain a line break), other fields (`event`, `id`, `retry`, comments)
/// kept in place, ended by a blank line.
pub fn rewrite_event(raw: &[u8], data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(raw.len() + data.len());
    let mut wrote_data = false;
    for line in raw.split(|&b| b == b'\n' || b == b'\r') {
        if line.is_empty() {
            continue;
        }
        let name = line.split(|&b| b == b':').next().unwrap_or(line);
        if name == b"data" && !line.starts_with(b":") {
            if !wrote_data {
                out.extend_from_slice(b"data: ");
                out.extend_from_slice(data);
                out.push(b'\n');
                wrote_data = true;
            }
            continue;
        }
        out.extend_from_slice(line);
        out.push(b'\n');
    }
    if !wrote_data {
        out.extend_from_slice(b"data: ");
        out.extend_from_slice(data);
        out.push(b'\n');
    }
    out.push(b'\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(pieces: &[Piece]) -> Vec<(String, bool)> {
        pieces
            .iter()
            .filter_map(|p| match p {
                Piece::Event(e) => {
                    Some((String::from_utf8_lossy(&e.data).into_owned(), e.has_data))
                }
                Piece::Uninspected { .. } => None,
            })
            .collect()
    }

    fn read_all(chunks: &[&[u8]], max: usize, keep_raw: bool) -> Vec<Piece> {
        let mut r = Reader::new(max, keep_raw);
        let mut out = Vec::new();
        for c in chunks {
            r.push(c, &mut out);
        }
        out
    }

    #[test]
    fn line_endings_and_fields() {
        let stream = b"event: message\nid: 1\ndata: {\"a\":1}\n\n: ping\n\ndata:x\r\ndata\r\n\r\ndata: y\r\rretry: 5\n\n";
        let out = read_all(&[stream], 1024, true);
        assert_eq!(
            events(&out),
            [
                ("{\"a\":1}".to_string(), true),
                (String::new(), false),
                ("x\n".to_string(), true),
                ("y".to_string(), true),
                (String::new(), false),
            ]
        );
        // Raw bytes of all events together are exactly the stream.
        let raw: Vec<u8> = out
            .iter()
            .flat_map(|p| match p {
                Piece::Event(e) => e.raw.clone(),
                Piece::Uninspected { bytes, .. } => bytes.clone(),
            })
            .collect();
        assert_eq!(raw, stream);
    }

    #[test]
    fn any_split_gives_the_same_events_and_bytes() {
        let stream: &[u8] =
            b"id: 1\r\ndata: {\"jsonrpc\":\"2.0\"}\r\n\r\ndata: a\rdata: b\r\r:c\n\ndata: zz\n\n";
        let whole = read_all(&[stream], 1024, true);
        for split in 0..stream.len() {
            let (a, b) = stream.split_at(split);
            assert_eq!(
                events(&read_all(&[a, b], 1024, true)),
                events(&whole),
                "split at {split}"
            );
        }
        let bytes: Vec<&[u8]> = stream.chunks(1).collect();
        assert_eq!(events(&read_all(&bytes, 1024, true)), events(&whole));
    }

    #[test]
    fn an_oversized_event_is_passed_on_not_kept() {
        let big = format!("data: {}\n\ndata: small\n\n", "x".repeat(5000));
        let chunks: Vec<&[u8]> = big.as_bytes().chunks(100).collect();
        let out = read_all(&chunks, 1000, true);
        assert_eq!(events(&out), [("small".to_string(), true)]);
        let passed: usize = out
            .iter()
            .map(|p| match p {
                Piece::Uninspected { bytes, .. } => bytes.len(),
                Piece::Event(_) => 0,
            })
            .sum();
        assert_eq!(passed, 5000 + 6 + 2);
        // Without raw bytes: one marker for the skipped event, nothing held.
        let out = read_all(&chunks, 1000, false);
        assert_eq!(
            out.iter()
                .filter(|p| matches!(p, Piece::Uninspected { .. }))
                .count(),
            1
        );
        assert_eq!(events(&out), [("small".to_string(), true)]);
    }

    #[test]
    fn many_short_lines_count_towards_the_bound() {
        let stream = "data: a\n".repeat(1000) + "\n";
        let mut r = Reader::new(500, false);
        let mut out = Vec::new();
        r.push(stream.as_bytes(), &mut out);
        assert!(matches!(out[0], Piece::Uninspected { first: true, .. }));
        assert!(r.data.capacity() <= 1024);
    }

    #[test]
    fn rewrite_keeps_other_fields() {
        let raw = b"event: message\r\nid: 7\r\ndata: {\"old\":\r\ndata: 1}\r\n\r\n";
        assert_eq!(
            rewrite_event(raw, b"{\"new\":2}"),
            b"event: message\nid: 7\ndata: {\"new\":2}\n\n"
        );
    }
}
