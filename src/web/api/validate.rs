//! An input file checked as OpenAI checks it: each line (1-based) that breaks a rule becomes an
//! entry of the batch's `errors.data` with OpenAI's code and parameter; a line that passes is
//! rendered as its job message by `publish::prepare` (contract §1), the validation `enqueue`
//! uses too. Pure: files are fed in as chunks, whatever their boundaries.

use std::collections::HashSet;

use serde::Serialize;
use serde_json::Value;

use crate::prices::PriceTable;
use crate::publish::Prepared;

/// A line's error, as `errors.data[]` has it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LineError {
    pub code: &'static str,
    pub line: u64,
    pub message: String,
    pub param: Option<&'static str>,
}

/// The lines of a file fed in chunks: whole lines with their numbers, blank lines skipped. A line
/// longer than `max` is not kept (memory stays bounded): it comes out as `Err(its length)`.
pub struct Lines {
    carry: Vec<u8>,
    carried: usize,
    line: u64,
    max: usize,
}

pub type Line = (u64, Result<Vec<u8>, usize>);

impl Lines {
    pub fn new(max: usize) -> Lines {
        Lines {
            carry: Vec::new(),
            carried: 0,
            line: 0,
            max,
        }
    }

    /// The lines that end in this chunk.
    pub fn feed(&mut self, mut chunk: &[u8]) -> Vec<Line> {
        let mut out = Vec::new();
        while let Some(i) = chunk.iter().position(|b| *b == b'\n') {
            self.take(&chunk[..i]);
            self.end_line(&mut out);
            chunk = &chunk[i + 1..];
        }
        self.take(chunk);
        out
    }

    /// The last line, if the file does not end with a newline.
    pub fn finish(&mut self) -> Vec<Line> {
        let mut out = Vec::new();
        if self.carried > 0 {
            self.end_line(&mut out);
        }
        out
    }

    fn take(&mut self, part: &[u8]) {
        self.carried += part.len();
        if self.carried <= self.max {
            self.carry.extend_from_slice(part);
        } else {
            self.carry = Vec::new();
        }
    }

    fn end_line(&mut self, out: &mut Vec<Line>) {
        self.line += 1;
        let len = std::mem::take(&mut self.carried);
        let line = std::mem::take(&mut self.carry);
        if len > self.max {
            out.push((self.line, Err(len)));
        } else if !line.trim_ascii().is_empty() {
            out.push((self.line, Ok(line)));
        }
    }
}

/// Counts the requests (non-blank lines) of a file fed in chunks.
#[derive(Debug, Default)]
pub struct LineCount {
    pub lines: u64,
    in_request: bool,
}

impl LineCount {
    pub fn feed(&mut self, chunk: &[u8]) {
        for b in chunk {
            if *b == b'\n' {
                self.lines += self.in_request as u64;
                self.in_request = false;
            } else if !b.is_ascii_whitespace() {
                self.in_request = true;
            }
        }
    }

    pub fn finish(&mut self) -> u64 {
        self.lines += std::mem::take(&mut self.in_request) as u64;
        self.lines
    }
}

/// Checks the lines of one batch's input file.
pub struct Checker<'a> {
    pub endpoint: &'a str,
    pub batch_id: &'a str,
    pub max_message_bytes: usize,
    pub prices: &'a PriceTable,
    seen: HashSet<String>,
}

fn error(line: u64, code: &'static str, param: Option<&'static str>, message: impl Into<String>) -> LineError {
    LineError {
        code,
        line,
        message: message.into(),
        param,
    }
}

fn missing(line: u64, param: &'static str) -> LineError {
    error(
        line,
        "missing_required_parameter",
        Some(param),
        format!("Missing required parameter: '{param}'."),
    )
}

impl<'a> Checker<'a> {
    pub fn new(endpoint: &'a str, batch_id: &'a str, max_message_bytes: usize, prices: &'a PriceTable) -> Self {
        Checker {
            endpoint,
            batch_id,
            max_message_bytes,
            prices,
            seen: HashSet::new(),
        }
    }

    /// Checks one line as it came out of [`Lines`].
    pub fn check(&mut self, n: u64, line: &Result<Vec<u8>, usize>) -> Result<Prepared, LineError> {
        let bytes = match line {
            Ok(b) => b,
            Err(len) => {
                return Err(error(
                    n,
                    "invalid_request",
                    None,
                    format!(
                        "This line is {len} bytes, larger than the maximum request of {} bytes.",
                        self.max_message_bytes
                    ),
                ))
            }
        };
        let Ok(value) = serde_json::from_slice::<Value>(bytes) else {
            return Err(error(
                n,
                "invalid_json_line",
                None,
                "This line is not parseable as valid JSON.",
            ));
        };
        let Some(o) = value.as_object() else {
            return Err(error(n, "invalid_request", None, "Each line must be a JSON object."));
        };
        let custom_id = match o.get("custom_id") {
            None | Some(Value::Null) => return Err(missing(n, "custom_id")),
            Some(Value::String(s)) => s.clone(),
            Some(_) => {
                return Err(error(
                    n,
                    "invalid_type",
                    Some("custom_id"),
                    "Invalid type for 'custom_id': expected a string.",
                ))
            }
        };
        match o.get("method") {
            None | Some(Value::Null) => return Err(missing(n, "method")),
            Some(Value::String(m)) if m == "POST" => {}
            Some(_) => {
                return Err(error(
                    n,
                    "invalid_value",
                    Some("method"),
                    "Invalid value for 'method': only POST is supported.",
                ))
            }
        }
        match o.get("url") {
            None | Some(Value::Null) => return Err(missing(n, "url")),
            Some(Value::String(u)) if u == self.endpoint => {}
            Some(_) => {
                return Err(error(
                    n,
                    "invalid_url",
                    Some("url"),
                    "The URL provided for this request does not match the batch endpoint.",
                ))
            }
        }
        let body = match o.get("body") {
            None | Some(Value::Null) => return Err(missing(n, "body")),
            Some(Value::Object(b)) => b,
            Some(_) => {
                return Err(error(
                    n,
                    "invalid_type",
                    Some("body"),
                    "Invalid type for 'body': expected an object.",
                ))
            }
        };
        if body.get("stream") == Some(&Value::Bool(true)) {
            return Err(error(
                n,
                "streaming_unsupported",
                Some("body.stream"),
                "Chat Completions: Streaming is not supported in the Batch API.",
            ));
        }
        let model = match body.get("model") {
            None | Some(Value::Null) => {
                return Err(error(
                    n,
                    "invalid_request",
                    Some("body.model"),
                    "Model parameter is required.",
                ))
            }
            Some(Value::String(m)) => m.clone(),
            Some(_) => {
                return Err(error(
                    n,
                    "invalid_type",
                    Some("body.model"),
                    "Invalid type for 'body.model': expected a string.",
                ))
            }
        };
        if body.get("messages").is_none_or(Value::is_null) {
            return Err(error(
                n,
                "invalid_request",
                Some("body.messages"),
                "Messages parameter is required.",
            ));
        }
        if self.prices.get(&model).is_none() {
            return Err(error(
                n,
                "model_not_found",
                Some("body.model"),
                format!(
                    "The provided model '{model}' is not supported by the Batch API (sheepdog has no price for it)."
                ),
            ));
        }
        if self.seen.contains(&custom_id) {
            return Err(error(
                n,
                "duplicate_custom_id",
                Some("custom_id"),
                "The custom_id for this request is a duplicate of another request. The custom_id parameter must be unique for each request in a batch.",
            ));
        }
        let p = crate::publish::prepare(value, self.batch_id, self.max_message_bytes)
            .map_err(|reason| error(n, "invalid_request", None, reason))?;
        self.seen.insert(custom_id);
        Ok(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines_of(chunks: &[&[u8]], max: usize) -> Vec<Line> {
        let mut l = Lines::new(max);
        let mut out: Vec<Line> = chunks.iter().flat_map(|c| l.feed(c)).collect();
        out.extend(l.finish());
        out
    }

    #[test]
    fn lines_across_chunks_blank_lines_skipped_long_lines_cut() {
        let out = lines_of(&[b"ab", b"c\n\n  \nde", b"f"], 10);
        assert_eq!(out, vec![(1, Ok(b"abc".to_vec())), (4, Ok(b"def".to_vec()))]);
        let out = lines_of(&[b"0123456789", b"0123\nok\n"], 10);
        assert_eq!(out, vec![(1, Err(14)), (2, Ok(b"ok".to_vec()))]);
        let mut c = LineCount::default();
        c.feed(b"a\n\n b");
        c.feed(b"\nc");
        assert_eq!(c.finish(), 3);
    }

    #[test]
    fn each_rule_has_openai_code_and_param() {
        let prices = PriceTable::built_in();
        let mut c = Checker::new("/v1/chat/completions", "batch_x", 1 << 20, &prices);
        let ok = |id: &str| {
            format!(
                r#"{{"custom_id":"{id}","method":"POST","url":"/v1/chat/completions","body":{{"model":"gpt-4o-mini","messages":[{{"role":"user","content":"hi"}}]}}}}"#
            )
        };
        let mut check = |n: u64, s: &str| c.check(n, &Ok(s.as_bytes().to_vec()));
        let p = check(1, &ok("a")).unwrap();
        assert!(String::from_utf8(p.payload)
            .unwrap()
            .contains(r#""batch_id":"batch_x""#));
        let code = |r: Result<Prepared, LineError>| r.map(|_| ()).unwrap_err();
        assert_eq!(code(check(2, &ok("a"))).code, "duplicate_custom_id");
        assert_eq!(code(check(3, "{nope")).code, "invalid_json_line");
        let e = code(check(4, r#"{"method":"POST","url":"/v1/chat/completions","body":{}}"#));
        assert_eq!(
            (e.code, e.param, e.line),
            ("missing_required_parameter", Some("custom_id"), 4)
        );
        let e = code(check(5, &ok("b").replace("/v1/chat/completions", "/v1/embeddings")));
        assert_eq!((e.code, e.param), ("invalid_url", Some("url")));
        let e = code(check(6, &ok("c").replace(r#""model""#, r#""stream":true,"model""#)));
        assert_eq!((e.code, e.param), ("streaming_unsupported", Some("body.stream")));
        let e = code(check(7, &ok("d").replace("gpt-4o-mini", "no-such-model")));
        assert_eq!((e.code, e.param), ("model_not_found", Some("body.model")));
        let e = code(check(
            8,
            &ok("e").replace(r#""messages":[{"role":"user","content":"hi"}]"#, r#""messages":[]"#),
        ));
        assert_eq!(e.code, "invalid_request");
        assert!(e.message.contains("messages"));
        let e = c.check(9, &Err(5_000_000)).unwrap_err();
        assert_eq!((e.code, e.line), ("invalid_request", 9));
    }
}
