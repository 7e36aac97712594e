//! Splits a QMP byte stream into top-level JSON texts without parsing them:
//! tracks nesting, strings and escapes, and bounds every message.

/// Why the stream could not be split; the connection cannot continue after
/// `TooLarge` (there is no way to resynchronise inside a huge value).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// One complete top-level JSON text (object, array or scalar).
    Message(Vec<u8>),
    /// A closing bracket with nothing open.
    Unbalanced(u8),
    /// Nesting deeper than the limit; the value is dropped.
    TooDeep,
    /// A message longer than the limit.
    TooLarge,
}

pub struct Splitter {
    buf: Vec<u8>,
    depth: usize,
    in_string: bool,
    escape: bool,
    scalar: bool,
    /// Inside a value being skipped because it nested too deep.
    skipping: bool,
    max_len: usize,
    max_depth: usize,
}

impl Splitter {
    pub fn new(max_len: usize, max_depth: usize) -> Splitter {
        Splitter { buf: Vec::new(), depth: 0, in_string: false, escape: false, scalar: false, skipping: false, max_len, max_depth }
    }

    /// Bytes of an incomplete message held.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    /// One byte inside a string; true when it closed the string.
    fn string_byte(&mut self, c: u8) -> bool {
        if self.escape {
            self.escape = false;
        } else if c == b'\\' {
            self.escape = true;
        } else if c == b'"' {
            self.in_string = false;
            return true;
        }
        false
    }

    fn emit_scalar(&mut self, out: &mut Vec<Frame>) {
        self.scalar = false;
        out.push(Frame::Message(std::mem::take(&mut self.buf)));
    }

    /// Feeds bytes; complete frames are appended to `out`. After
    /// `Frame::TooLarge` the caller should drop the connection.
    pub fn feed(&mut self, data: &[u8], out: &mut Vec<Frame>) {
        for &c in data {
            if self.depth == 0 && !self.skipping {
                if self.scalar && self.in_string {
                    // A top-level string: its end is the closing quote.
                    self.buf.push(c);
                    if self.string_byte(c) {
                        self.emit_scalar(out);
                        continue;
                    }
                    if self.buf.len() > self.max_len {
                        *self = Splitter::new(self.max_len, self.max_depth);
                        out.push(Frame::TooLarge);
                        return;
                    }
                    continue;
                }
                if self.scalar {
                    if c.is_ascii_whitespace() || matches!(c, b'{' | b'[' | b'}' | b']') {
                        self.emit_scalar(out);
                    } else {
                        self.buf.push(c);
                        if self.buf.len() > self.max_len {
                            self.buf = Vec::new();
                            self.scalar = false;
                            out.push(Frame::TooLarge);
                            return;
                        }
                        continue;
                    }
                }
                match c {
                    b' ' | b'\t' | b'\r' | b'\n' => {}
                    b'{' | b'[' => {
                        self.buf.push(c);
                        self.depth = 1;
                    }
                    b'}' | b']' => out.push(Frame::Unbalanced(c)),
                    _ => {
                        self.scalar = true;
                        self.in_string = c == b'"';
                        self.buf.push(c);
                    }
                }
                continue;
            }
            if !self.skipping {
                self.buf.push(c);
                if self.buf.len() > self.max_len {
                    *self = Splitter::new(self.max_len, self.max_depth);
                    out.push(Frame::TooLarge);
                    return;
                }
            }
            if self.in_string {
                self.string_byte(c);
                continue;
            }
            match c {
                b'"' => self.in_string = true,
                b'{' | b'[' => {
                    self.depth += 1;
                    if self.depth > self.max_depth && !self.skipping {
                        self.skipping = true;
                        self.buf = Vec::new();
                        out.push(Frame::TooDeep);
                    }
                }
                b'}' | b']' => {
                    self.depth -= 1;
                    if self.depth == 0 {
                        if self.skipping {
                            self.skipping = false;
                        } else {
                            out.push(Frame::Message(std::mem::take(&mut self.buf)));
                        }
                    }
                }
                _ => {}
            }
        }
        // A scalar at the very end of the data stays pending: more digits
        // or letters may follow in the next read.
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(chunks: &[&[u8]]) -> Vec<Frame> {
        let mut s = Splitter::new(64, 4);
        let mut out = Vec::new();
        for c in chunks {
            s.feed(c, &mut out);
        }
        out
    }

    fn msg(s: &str) -> Frame {
        Frame::Message(s.as_bytes().to_vec())
    }

    #[test]
    fn objects_across_reads_and_strings_with_brackets() {
        let f = split(&[b"{\"execute\": \"a}\\\"{\"", b"}\n{\"x\":[1,{}]}  [1]"]);
        assert_eq!(f, vec![msg("{\"execute\": \"a}\\\"{\"}"), msg("{\"x\":[1,{}]}"), msg("[1]")]);
    }

    #[test]
    fn scalars_garbage_and_unbalanced() {
        let f = split(&[b"42 garbage{\"a\":1}}"]);
        assert_eq!(f, vec![msg("42"), msg("garbage"), msg("{\"a\":1}"), Frame::Unbalanced(b'}')]);
        let f = split(&[b"\"a \\\" {b\"", b" 7"]);
        assert_eq!(f, vec![msg("\"a \\\" {b\"")]);
    }

    #[test]
    fn limits() {
        assert_eq!(split(&[&[b'x'; 100]]), vec![Frame::TooLarge]);
        let mut big = b"{\"a\":\"".to_vec();
        big.extend([b'y'; 100]);
        assert_eq!(split(&[&big]), vec![Frame::TooLarge]);
        // Too deep: reported once, the value is skipped, the next one parses.
        assert_eq!(split(&[b"[[[[[[1]]]]]] {}"]), vec![Frame::TooDeep, msg("{}")]);
    }
}
