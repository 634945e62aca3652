//! Chat templates as Hugging Face writes them: `chat_template.jinja`, or `chat_template` in
//! `tokenizer_config.json` (a string, or a list of named templates of which `default` is used),
//! rendered with `minijinja` set up as `transformers` sets up Jinja (blocks trimmed, Python string
//! methods, `raise_exception`, `strftime_now`).

use std::path::Path;

use minijinja::{Environment, ErrorKind, Value};
use serde_json::Value as Json;

use crate::ServeError;
use crate::model::special_token;

/// A model's chat template and the special tokens it may print.
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    bos: Option<String>,
    eos: Option<String>,
}

impl ChatTemplate {
    /// The template of the model in `dir` (`tokenizer_config` is its parsed `tokenizer_config.json`),
    /// or `None` when it has none; a template that does not parse is an error naming the file.
    pub fn load(dir: &Path, tokenizer_config: Option<&Json>) -> Result<Option<Self>, ServeError> {
        let file = dir.join("chat_template.jinja");
        let (source, origin) = if file.is_file() {
            let text =
                std::fs::read_to_string(&file).map_err(|e| ServeError::Load(format!("{}: {e}", file.display())))?;
            (text, file.display().to_string())
        } else {
            let origin = format!("{}: chat_template", dir.join("tokenizer_config.json").display());
            match tokenizer_config.and_then(|c| c.get("chat_template")) {
                None | Some(Json::Null) => return Ok(None),
                Some(Json::String(s)) => (s.clone(), origin),
                Some(Json::Array(list)) => {
                    let default = list.iter().find(|t| t.get("name").and_then(Json::as_str) == Some("default"));
                    match default.and_then(|t| t.get("template")).and_then(Json::as_str) {
                        Some(s) => (s.to_string(), origin),
                        None => return Err(ServeError::Load(format!("{origin}: a list without a `default` template"))),
                    }
                }
                Some(_) => return Err(ServeError::Load(format!("{origin}: expected a string or a list"))),
            }
        };
        let mut env = Environment::new();
        env.set_syntax(
            minijinja::syntax::SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .build()
                .map_err(|e| ServeError::Load(format!("{origin}: {e}")))?,
        );
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |message: String| -> Result<Value, minijinja::Error> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
        });
        env.add_function("strftime_now", |format: String| -> String { strftime_now(&format) });
        env.add_template_owned("chat", source).map_err(|e| ServeError::Load(format!("{origin}: {e}")))?;
        let bos = special_token(tokenizer_config.and_then(|c| c.get("bos_token")));
        let eos = special_token(tokenizer_config.and_then(|c| c.get("eos_token")));
        Ok(Some(Self { env, bos, eos }))
    }

    /// The prompt text of `messages` (OpenAI's message objects, content as a string) followed by the
    /// assistant's turn; the template's own errors (`raise_exception`) come back as the message.
    pub fn render(&self, messages: &Json) -> Result<String, String> {
        let template = self.env.get_template("chat").map_err(|e| e.to_string())?;
        let ctx = minijinja::context! {
            messages => Value::from(minijinja::value::Serde(messages)),
            add_generation_prompt => true,
            bos_token => self.bos.clone().unwrap_or_default(),
            eos_token => self.eos.clone().unwrap_or_default(),
        };
        template.render(ctx).map_err(|e| match e.kind() {
            ErrorKind::InvalidOperation => e.detail().unwrap_or("the chat template refused the messages").to_string(),
            _ => format!("the chat template failed: {e}"),
        })
    }
}

/// Today's date and time in UTC formatted with the few `strftime` codes chat templates use
/// (`%d %b %Y`, `%Y-%m-%d`, …); other codes are kept as written.
fn strftime_now(format: &str) -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let days = (secs / 86_400) as i64;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    const MONTHS: [&str; 12] = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
    const FULL: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let (h, m, s) = (secs / 3600 % 24, secs / 60 % 60, secs % 60);
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('Y') => out.push_str(&year.to_string()),
            Some('b') => out.push_str(MONTHS[(month - 1) as usize]),
            Some('B') => out.push_str(FULL[(month - 1) as usize]),
            Some('H') => out.push_str(&format!("{h:02}")),
            Some('M') => out.push_str(&format!("{m:02}")),
            Some('S') => out.push_str(&format!("{s:02}")),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn template(source: &str) -> ChatTemplate {
        let dir = tempfile::tempdir().unwrap();
        let cfg = serde_json::json!({"chat_template": source, "bos_token": "<s>", "eos_token": {"content": "</s>"}});
        ChatTemplate::load(dir.path(), Some(&cfg)).unwrap().unwrap()
    }

    #[test]
    fn renders_a_template_as_transformers_does() {
        // Blocks trimmed, Python string methods, special tokens, the generation prompt.
        let t = template(
            "{{ bos_token }}{% for m in messages %}\n<|{{ m['role'] }}|>{{ m['content'].strip() }}{{ eos_token }}\n{% endfor %}\n{% if add_generation_prompt %}<|assistant|>{% endif %}",
        );
        let msgs = serde_json::json!([{"role": "system", "content": " Be brief. "}, {"role": "user", "content": "Hi"}]);
        // What Python's Jinja2 renders with transformers' settings (trim_blocks, lstrip_blocks).
        assert_eq!(t.render(&msgs).unwrap(), "<s><|system|>Be brief.</s>\n<|user|>Hi</s>\n<|assistant|>");
        let strict = template(
            "{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversations must start with the user') }}{% endif %}ok",
        );
        assert_eq!(strict.render(&msgs).unwrap_err(), "Conversations must start with the user");
        let dated = template("{{ strftime_now('%Y-%m-%d') }}");
        let today = dated.render(&msgs).unwrap();
        assert_eq!((today.len(), &today[4..5], &today[..2]), (10, "-", "20"));
    }

    #[test]
    fn finds_the_template_where_hugging_face_puts_it() {
        let dir = tempfile::tempdir().unwrap();
        assert!(ChatTemplate::load(dir.path(), None).unwrap().is_none());
        let listed = serde_json::json!({"chat_template": [{"name": "tool_use", "template": "x"}, {"name": "default", "template": "d"}]});
        let t = ChatTemplate::load(dir.path(), Some(&listed)).unwrap().unwrap();
        assert_eq!(t.render(&serde_json::json!([])).unwrap(), "d");
        std::fs::write(dir.path().join("chat_template.jinja"), "file").unwrap();
        let t = ChatTemplate::load(dir.path(), Some(&listed)).unwrap().unwrap();
        assert_eq!(t.render(&serde_json::json!([])).unwrap(), "file");
        std::fs::write(dir.path().join("chat_template.jinja"), "{% if %}").unwrap();
        let err = ChatTemplate::load(dir.path(), None).unwrap_err().to_string();
        assert!(err.contains("chat_template.jinja"), "{err}");
    }
}
