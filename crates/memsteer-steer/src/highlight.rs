//! The text of a highlight: what `steer highlight` found (per-token evidence and the strongest spans) and
//! its renderings, for a terminal and as a self-contained HTML page.

use memsteer_lm::Decoder;
use memsteer_lm::tokenizer::Tokenizer;

use crate::evidence::Span;
use crate::{Result, Steer, SteerError};

/// What `steer highlight` found.
#[derive(Debug, Clone, PartialEq)]
pub struct Highlight {
    /// Token ids of the text.
    pub tokens: Vec<u32>,
    /// Each token's text.
    pub pieces: Vec<String>,
    /// `log p₊(x_t | x_<t) − log p₋(x_t | x_<t)`; `None` for the first token (nothing predicts it).
    pub evidence: Vec<Option<f64>>,
    /// The chosen spans, strongest first.
    pub spans: Vec<Span>,
}

impl Highlight {
    /// The tokens (`id`, `text`, `evidence`) and spans (`start`, `end`, `evidence`, `text`) as
    /// `steer highlight --json` prints them.
    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "tokens": self.tokens.iter().zip(&self.pieces).zip(&self.evidence)
                .map(|((id, p), e)| serde_json::json!({"id": id, "text": p, "evidence": e}))
                .collect::<Vec<_>>(),
            "spans": self.spans.iter()
                .map(|s| serde_json::json!({"start": s.start, "end": s.end, "evidence": s.evidence,
                    "text": self.pieces[s.start..s.end].concat()}))
                .collect::<Vec<_>>(),
        })
    }
}

/// Highlights `tokens` (a text tokenized with `tok`) for the labelled steer of `steer` at `strength`:
/// per-token evidence `log p₊ − log p₋` (the labelled steer at `+strength` against `−strength`, the
/// dummy at 1), and the set of at most `spans` disjoint spans of at most `span_length` tokens with the
/// largest total evidence ([`crate::evidence::max_spans`]).
pub fn highlight(
    decoder: &dyn Decoder,
    steer: &Steer,
    tok: &Tokenizer,
    tokens: Vec<u32>,
    strength: f32,
    (spans, span_length): (usize, usize),
) -> Result<Highlight> {
    if span_length == 0 || !strength.is_finite() || strength == 0.0 || steer.labels().is_empty() {
        return Err(SteerError::Input(format!(
            "highlight needs spans of at least one token, a finite non-zero strength (found {strength}) and a labelled steer"
        )));
    }
    if tokens.len() < 2 || tokens.len() > decoder.context() {
        return Err(SteerError::Input(format!(
            "the text has {} token(s); evidence needs at least two and at most the model's context of {}",
            tokens.len(),
            decoder.context()
        )));
    }
    let hidden = decoder.hidden_states(&tokens)?;
    let rows = &hidden[..(tokens.len() - 1) * decoder.dim()];
    let at = |v: f32| -> Result<Vec<f32>> {
        let mut labelled = vec![0.0f32; steer.labels().len()];
        labelled[0] = v;
        steer.log_prob_targets(rows, crate::OutputLayer::of(decoder), &tokens[1..], &steer.strengths(&labelled)?)
    };
    let (plus, minus) = (at(strength)?, at(-strength)?);
    let mut evidence = vec![None];
    evidence.extend(plus.iter().zip(&minus).map(|(p, m)| Some(f64::from(*p) - f64::from(*m))));
    let spans = crate::evidence::max_spans(&evidence, spans, span_length);
    let pieces = token_pieces(tok, &tokens)?;
    Ok(Highlight { tokens, pieces, evidence, spans })
}

/// The text of every token: the growth of the decoded prefix. A token that ends inside a multi-byte
/// character (byte-level BPE) gets an empty piece and the token completing the character gets all of it,
/// so the pieces concatenate to the decoded text; where a prefix is not stable, the token alone.
pub fn token_pieces(tok: &Tokenizer, ids: &[u32]) -> Result<Vec<String>> {
    let mut pieces = Vec::with_capacity(ids.len());
    let mut prev = String::new();
    for k in 0..ids.len() {
        let full = tok.decode(&ids[..=k])?;
        // Trailing replacement characters stand for an incomplete character, unless the text ends here.
        let cur = if k + 1 < ids.len() { full.trim_end_matches('\u{FFFD}').to_string() } else { full };
        match cur.strip_prefix(prev.as_str()) {
            Some(rest) => {
                pieces.push(rest.to_string());
                prev = cur;
            }
            None => {
                pieces.push(tok.decode(&ids[k..=k])?);
                prev = cur;
            }
        }
    }
    Ok(pieces)
}

fn span_of(h: &Highlight, k: usize) -> Option<usize> {
    h.spans.iter().position(|s| (s.start..s.end).contains(&k))
}

/// The text with the spans in bold on a coloured background (when `color`), else in [[ ]].
pub fn render_terminal(h: &Highlight, color: bool) -> String {
    let mut out = String::new();
    for (k, piece) in h.pieces.iter().enumerate() {
        let inside = span_of(h, k);
        let opens = inside.is_some_and(|i| h.spans[i].start == k);
        let closes = inside.is_some_and(|i| h.spans[i].end == k + 1);
        if opens {
            out.push_str(if color { "\x1b[1;30;43m" } else { "[[" });
        }
        out.push_str(piece);
        if closes {
            out.push_str(if color { "\x1b[0m" } else { "]]" });
        }
    }
    out
}

/// Escapes text for HTML element content and attribute values.
pub fn html_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A self-contained page: tokens coloured by evidence (green where the steer at `strength` makes the token
/// likelier than at `−strength`, red where less likely), spans outlined, and the evidence of each token in
/// its tooltip.
pub fn render_html(h: &Highlight, label: &str, steer: &str, strength: f32) -> String {
    let scale = h.evidence.iter().flatten().fold(0.0f64, |m, e| m.max(e.abs())).max(1e-12);
    let mut body = String::new();
    for (k, piece) in h.pieces.iter().enumerate() {
        let inside = span_of(h, k);
        if inside.is_some_and(|i| h.spans[i].start == k) {
            let i = inside.unwrap_or(0);
            body.push_str(&format!(
                "<span class=\"span\" title=\"span {} · evidence {:+.3}\">",
                i + 1,
                h.spans[i].evidence
            ));
        }
        let (style, title) = match h.evidence[k] {
            Some(e) => {
                let alpha = (e.abs() / scale).min(1.0) * 0.6;
                let rgb = if e >= 0.0 { "22,163,74" } else { "220,38,38" };
                (format!(" style=\"background: rgba({rgb},{alpha:.3})\""), format!("{e:+.4}"))
            }
            None => (String::new(), "first token (no evidence)".to_string()),
        };
        body.push_str(&format!(
            "<span class=\"tok\"{style} title=\"id {} · {}\">{}</span>",
            h.tokens[k],
            html_escape(&title),
            html_escape(piece)
        ));
        if inside.is_some_and(|i| h.spans[i].end == k + 1) {
            body.push_str("</span>");
        }
    }
    let mut list = String::new();
    for (i, s) in h.spans.iter().enumerate() {
        list.push_str(&format!(
            "<li>span {}: tokens {}–{}, evidence {:+.3}: <q>{}</q></li>\n",
            i + 1,
            s.start,
            s.end - 1,
            s.evidence,
            html_escape(&h.pieces[s.start..s.end].concat())
        ));
    }
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>memsteer highlight: {label}</title>\n<style>\n\
body {{ font-family: system-ui, sans-serif; max-width: 50em; margin: 2em auto; line-height: 1.9; }}\n\
.text {{ white-space: pre-wrap; font-family: ui-monospace, monospace; }}\n\
.tok {{ border-radius: 2px; }}\n\
.span {{ outline: 2px solid #1d4ed8; border-radius: 3px; }}\n\
.legend {{ color: #555; font-size: 0.9em; }}\n\
</style>\n</head>\n<body>\n<h1>Evidence {direction} “{label}”</h1>\n\
<p class=\"legend\">Steer {steer}. Each token is coloured by log p₊(x<sub>t</sub> | x<sub>&lt;t</sub>) − log p₋(x<sub>t</sub> | x<sub>&lt;t</sub>) \
(the labelled steer at {plus} against {minus}): green where the token is likelier at {plus}, red where it is likelier at {minus}; outlined: the strongest spans.</p>\n\
<div class=\"text\">{body}</div>\n<ol>\n{list}</ol>\n</body>\n</html>\n",
        label = html_escape(label),
        steer = html_escape(steer),
        plus = strength,
        minus = -strength,
        direction = if strength > 0.0 { "for" } else { "against" },
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn html_escape_escapes_markup() {
        assert_eq!(super::html_escape("<b>&\"'"), "&lt;b&gt;&amp;&quot;&#39;");
    }
}
