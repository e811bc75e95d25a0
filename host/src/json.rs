//! Limits on JSON that arrives from outside (client frames, API bodies,
//! plugin output), checked once at the door.
//!
//! serde_json refuses to parse more than 128 nested levels. A payload that
//! is accepted at a shallower parse (kept as raw text) and later embedded in
//! an envelope (a frame, a webhook body, a plugin's input) could cross that
//! limit on re-reading and come back as an error. So every path that accepts
//! JSON refuses anything nested deeper than [`MAX_DEPTH`], which leaves room
//! for every envelope the gateway wraps around it. This module is not a
//! parser: it only measures nesting, in one pass over the bytes.

/// The deepest nesting of arrays and objects accepted in any JSON document
/// from outside, the outermost level counting as 1 (documented in
/// `docs/protocol.md` and `docs/api.md`).
pub const MAX_DEPTH: usize = 64;

/// A document nested deeper than allowed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("JSON nested deeper than {max} levels")]
pub struct TooDeep {
    /// The limit that was crossed.
    pub max: usize,
}

/// The deepest nesting of `[` / `{` in `text`, ignoring brackets inside
/// strings. Malformed JSON is measured as far as it goes; parsing it is the
/// caller's job.
pub fn depth(text: &str) -> usize {
    let mut depth = 0usize;
    let mut deepest = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for &b in text.as_bytes() {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

/// Refuses `text` when it nests deeper than `max`.
pub fn check_depth(text: &str, max: usize) -> Result<(), TooDeep> {
    if depth(text) > max {
        Err(TooDeep { max })
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[track_caller]
    fn check(text: &str, expect: usize) {
        assert_eq!(depth(text), expect, "depth of {text:?}");
    }

    #[test]
    fn measures_nesting() {
        check("1", 0);
        check("\"[[[\"", 0);
        check("[]", 1);
        check("{\"a\":[1,{\"b\":[]}]}", 4);
        check("[\"]\\\"[\",[[]]]", 3);
        check("[[[", 3);
    }

    #[test]
    fn refuses_past_the_limit() {
        let deep = format!("{}{}", "[".repeat(MAX_DEPTH + 1), "]".repeat(MAX_DEPTH + 1));
        assert_eq!(
            check_depth(&deep, MAX_DEPTH),
            Err(TooDeep { max: MAX_DEPTH })
        );
        let ok = format!("{}{}", "[".repeat(MAX_DEPTH), "]".repeat(MAX_DEPTH));
        assert_eq!(check_depth(&ok, MAX_DEPTH), Ok(()));
        // Whatever passes the door re-parses inside every envelope.
        let wrapped = format!("{}{}{}", "{\"a\":".repeat(8), ok, "}".repeat(8));
        assert!(serde_json::from_str::<serde_json::Value>(&wrapped).is_ok());
    }
}
