//! Finds where a `Transfer-Encoding: chunked` body ends, without decoding it: the fast HTTP/1
//! path relays chunked responses byte for byte and needs to know when the message is over to
//! keep both connections alive.

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("malformed chunked body")]
pub struct MalformedChunked;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Hex digits of a chunk size: whether any was seen, and how many count (leading
    /// zeros do not: `00000000000000003` is 3).
    Size {
        any: bool,
        significant: u8,
    },
    /// Chunk extension after `;`, up to the line end.
    Extension,
    /// Saw CR at the end of the size line.
    SizeLf,
    /// Inside chunk data.
    Data,
    DataCr,
    DataLf,
    /// At the start of a trailer line (or the final empty line).
    TrailerStart,
    /// Inside a trailer field line.
    Trailer,
    TrailerLf {
        last: bool,
    },
    Done,
}

#[derive(Debug, Clone)]
pub struct ChunkedTracker {
    phase: Phase,
    size: u64,
    remaining: u64,
    /// Whether a whole chunk size line has been read.
    size_line_read: bool,
}

impl Default for ChunkedTracker {
    fn default() -> Self {
        Self {
            phase: Phase::Size {
                any: false,
                significant: 0,
            },
            size: 0,
            remaining: 0,
            size_line_read: false,
        }
    }
}

impl ChunkedTracker {
    /// Whether the first chunk size line has been read whole (and found valid).
    pub fn size_line_read(&self) -> bool {
        self.size_line_read
    }

    /// Feeds the next bytes of the body. Returns `Some(n)` when the body ends after the first
    /// `n` bytes of `data`, `None` when more bytes are needed.
    pub fn feed(&mut self, data: &[u8]) -> Result<Option<usize>, MalformedChunked> {
        let mut i = 0;
        while i < data.len() {
            let b = data[i];
            match self.phase {
                Phase::Done => return Ok(Some(i)),
                Phase::Data => {
                    let take =
                        (data.len() - i).min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
                    i += take;
                    self.remaining -= take as u64;
                    if self.remaining == 0 {
                        self.phase = Phase::DataCr;
                    }
                    continue;
                }
                Phase::Size { any, significant } => match b {
                    b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                        // 15 significant hex digits at most: no overflow, sizes < 2^60.
                        let significant = significant + u8::from(significant > 0 || b != b'0');
                        if significant > 15 {
                            return Err(MalformedChunked);
                        }
                        let v = (b as char).to_digit(16).unwrap_or(0) as u64;
                        self.size = self.size * 16 + v;
                        self.phase = Phase::Size {
                            any: true,
                            significant,
                        };
                    }
                    b';' | b' ' | b'\t' if any => self.phase = Phase::Extension,
                    b'\r' if any => self.phase = Phase::SizeLf,
                    _ => return Err(MalformedChunked),
                },
                Phase::Extension => {
                    if b == b'\r' {
                        self.phase = Phase::SizeLf;
                    } else if b == b'\n' {
                        return Err(MalformedChunked);
                    }
                }
                Phase::SizeLf => {
                    if b != b'\n' {
                        return Err(MalformedChunked);
                    }
                    self.size_line_read = true;
                    if self.size == 0 {
                        self.phase = Phase::TrailerStart;
                    } else {
                        self.remaining = self.size;
                        self.phase = Phase::Data;
                    }
                    self.size = 0;
                }
                Phase::DataCr => {
                    if b != b'\r' {
                        return Err(MalformedChunked);
                    }
                    self.phase = Phase::DataLf;
                }
                Phase::DataLf => {
                    if b != b'\n' {
                        return Err(MalformedChunked);
                    }
                    self.phase = Phase::Size {
                        any: false,
                        significant: 0,
                    };
                }
                Phase::TrailerStart => {
                    self.phase = if b == b'\r' {
                        Phase::TrailerLf { last: true }
                    } else if b == b'\n' {
                        return Err(MalformedChunked);
                    } else {
                        Phase::Trailer
                    };
                }
                Phase::Trailer => {
                    if b == b'\r' {
                        self.phase = Phase::TrailerLf { last: false };
                    } else if b == b'\n' {
                        // A bare LF could end the message earlier for a lenient client.
                        return Err(MalformedChunked);
                    }
                }
                Phase::TrailerLf { last } => {
                    if b != b'\n' {
                        return Err(MalformedChunked);
                    }
                    if last {
                        self.phase = Phase::Done;
                        return Ok(Some(i + 1));
                    }
                    self.phase = Phase::TrailerStart;
                }
            }
            i += 1;
        }
        Ok(if self.phase == Phase::Done {
            Some(i)
        } else {
            None
        })
    }
}

impl ChunkedTracker {
    /// As `feed`, and appends `data` (up to the end of the body) to `out` with the leading
    /// zeros of chunk sizes but one taken out (`00000000000000003` becomes `03`): Pingora's
    /// parser (httparse) counts leading zeros towards its 16-digit limit and would refuse it.
    pub fn feed_normalized(
        &mut self,
        data: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<Option<usize>, MalformedChunked> {
        let mut i = 0;
        while i < data.len() {
            if self.phase == Phase::Data {
                i += self.copy_data(&data[i..], out);
                continue;
            }
            let b = data[i];
            let before = self.phase;
            let ended = self.feed(&data[i..i + 1])?;
            // The first zero stays: one byte out for at most one in, so the result fits where
            // the input was (`backend_conn` rewrites in place).
            if !matches!(before, Phase::Size { any: true, significant: 0 } if b == b'0') {
                out.push(b);
            }
            i += 1;
            if ended.is_some() {
                return Ok(Some(i));
            }
        }
        Ok(None)
    }
}

impl ChunkedTracker {
    /// In a chunk's data: copies what of `data` belongs to it to `out`; returns how much.
    fn copy_data(&mut self, data: &[u8], out: &mut Vec<u8>) -> usize {
        let take = data
            .len()
            .min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
        out.extend_from_slice(&data[..take]);
        self.remaining -= take as u64;
        if self.remaining == 0 {
            self.phase = Phase::DataCr;
        }
        take
    }

    /// As `feed`, and appends the chunks' data only (no size lines, no trailers) to `out`:
    /// a chunked HTTP/1.1 body turned into the bytes an HTTP/2 client gets in DATA frames.
    pub fn feed_decoded(
        &mut self,
        data: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<Option<usize>, MalformedChunked> {
        let mut i = 0;
        while i < data.len() {
            if self.phase == Phase::Data {
                i += self.copy_data(&data[i..], out);
                continue;
            }
            let ended = self.feed(&data[i..i + 1])?;
            i += 1;
            if ended.is_some() {
                return Ok(Some(i));
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn end_of(body: &[u8]) -> Result<Option<usize>, MalformedChunked> {
        ChunkedTracker::default().feed(body)
    }

    #[test]
    fn finds_the_end_of_simple_bodies() {
        assert_eq!(end_of(b"0\r\n\r\n"), Ok(Some(5)));
        assert_eq!(end_of(b"5\r\nhello\r\n0\r\n\r\nNEXT"), Ok(Some(15)));
        assert_eq!(end_of(b"A;name=v\r\n0123456789\r\n0\r\n\r\n"), Ok(Some(27)));
        assert_eq!(
            end_of(b"1\r\nx\r\n0\r\nExpires: never\r\nX: y\r\n\r\n"),
            Ok(Some(33))
        );
    }

    #[test]
    fn needs_more_until_the_last_line() {
        assert_eq!(end_of(b"5\r\nhel"), Ok(None));
        assert_eq!(end_of(b"0\r\n\r"), Ok(None));
        assert_eq!(end_of(b"0\r\nTrailer: x\r\n"), Ok(None));
    }

    #[test]
    fn same_result_fed_one_byte_at_a_time() {
        let body = b"3\r\nabc\r\n10\r\n0123456789abcdef\r\n0\r\nT: 1\r\n\r\n";
        for split in 0..body.len() {
            let mut t = ChunkedTracker::default();
            let first = t.feed(&body[..split]).unwrap();
            assert_eq!(first, None, "split {split}");
            assert_eq!(t.feed(&body[split..]).unwrap(), Some(body.len() - split));
        }
        let mut t = ChunkedTracker::default();
        for (i, b) in body.iter().enumerate() {
            let r = t.feed(std::slice::from_ref(b)).unwrap();
            assert_eq!(r.is_some(), i == body.len() - 1);
        }
    }

    #[test]
    fn leading_zeros_do_not_count_towards_the_size_limit() {
        assert_eq!(
            end_of(b"00000000000000003\r\nabc\r\n0\r\n\r\n"),
            Ok(Some(29))
        );
        assert_eq!(end_of(b"0000000000000000000\r\n\r\n"), Ok(Some(23)));
        assert_eq!(end_of(b"000fffffffffffffff\r\n"), Ok(None));
        assert_eq!(end_of(b"0001000000000000000\r\n"), Err(MalformedChunked));
    }

    #[test]
    fn leading_zeros_are_taken_out_for_pingora() {
        let body = b"00000000000000003;x=1\r\nabc\r\n000A\r\n0123456789\r\n00\r\nT: 0\r\n\r\nNEXT";
        let want = b"03;x=1\r\nabc\r\n0A\r\n0123456789\r\n0\r\nT: 0\r\n\r\n";
        let end = body.len() - 4;
        let mut out = Vec::new();
        let got = ChunkedTracker::default().feed_normalized(body, &mut out);
        assert_eq!(got, Ok(Some(end)));
        assert_eq!(
            out.escape_ascii().to_string(),
            want.escape_ascii().to_string()
        );
        // The same, one byte at a time.
        let mut t = ChunkedTracker::default();
        let mut out = Vec::new();
        for (i, b) in body.iter().enumerate() {
            if let Some(n) = t
                .feed_normalized(std::slice::from_ref(b), &mut out)
                .unwrap()
            {
                assert_eq!((i + 1, n), (end, 1));
                break;
            }
        }
        assert_eq!(
            out.escape_ascii().to_string(),
            want.escape_ascii().to_string()
        );
        assert_eq!(
            ChunkedTracker::default().feed_normalized(b"zz\r\n", &mut Vec::new()),
            Err(MalformedChunked)
        );
    }

    #[test]
    fn decoded_bodies_are_the_chunks_data() {
        let body = b"00003;x=1\r\nabc\r\nA\r\n0123456789\r\n0\r\nT: 0\r\n\r\nNEXT";
        let end = body.len() - 4;
        for piece in [1, 2, 5, 4096] {
            let mut t = ChunkedTracker::default();
            let mut out = Vec::new();
            let mut ended = None;
            for (n, chunk) in body.chunks(piece).enumerate() {
                if let Some(k) = t.feed_decoded(chunk, &mut out).unwrap() {
                    ended = Some(n * piece + k);
                    break;
                }
            }
            assert_eq!(ended, Some(end), "pieces of {piece}");
            assert_eq!(out, b"abc0123456789", "pieces of {piece}");
        }
        let mut out = Vec::new();
        assert_eq!(
            ChunkedTracker::default().feed_decoded(b"3\r\nabcX", &mut out),
            Err(MalformedChunked)
        );
    }

    #[test]
    fn rejects_garbage() {
        assert_eq!(end_of(b"zz\r\n"), Err(MalformedChunked));
        assert_eq!(end_of(b"\r\n"), Err(MalformedChunked));
        assert_eq!(end_of(b"3\r\nabcX"), Err(MalformedChunked));
        assert_eq!(end_of(b"3\nabc"), Err(MalformedChunked));
        assert_eq!(end_of(b"ffffffffffffffff0\r\n"), Err(MalformedChunked));
        assert_eq!(
            end_of(b"0\r\nX: a\n\nHTTP/1.1 200 OK\r\n\r\n"),
            Err(MalformedChunked)
        );
    }
}
