//! Chat templates: the model's own Jinja template (from GGUF `tokenizer.chat_template` or
//! `tokenizer_config.json`), rendered with minijinja the way transformers'
//! `apply_chat_template` renders it (trim_blocks, lstrip_blocks, `raise_exception`, Python
//! string methods).

use crate::error::{ModelError, Result};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// Instructions a template may run per rendering: a real chat template needs a few thousand
/// (tens of thousands for a long conversation); a template from an untrusted model file that
/// loops without end runs out instead of hanging the server.
pub const TEMPLATE_FUEL: u64 = 5_000_000;

/// The longest prompt text a template may produce, as a bound on memory.
pub const TEMPLATE_MAX_OUTPUT: usize = 16 << 20;

/// Renders `messages` with `template`; `add_generation_prompt` opens the assistant's turn.
/// The template is untrusted (it comes from the model file): it can reach no file or network
/// (minijinja has no such functions, and no loader is set), its instructions are bounded by
/// [`TEMPLATE_FUEL`] and its output by [`TEMPLATE_MAX_OUTPUT`] plus the conversation itself.
pub fn render(
    template: &str,
    messages_in: &[Message],
    add_generation_prompt: bool,
    bos_token: &str,
    eos_token: &str,
) -> Result<String> {
    let mut env = minijinja::Environment::new();
    let syntax = minijinja::syntax::SyntaxConfig::builder()
        .trim_blocks(true)
        .lstrip_blocks(true)
        .build()
        .map_err(|e| ModelError::Tokenizer(format!("chat template syntax: {e}")))?;
    env.set_syntax(syntax);
    env.set_fuel(Some(TEMPLATE_FUEL));
    minijinja_contrib::add_to_environment(&mut env);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |msg: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                msg,
            ))
        },
    );
    let err = |e: minijinja::Error| ModelError::Tokenizer(format!("chat template: {e}"));
    env.add_template("chat", template).map_err(err)?;
    let tmpl = env.get_template("chat").map_err(err)?;
    let messages: Vec<minijinja::Value> = messages_in
        .iter()
        .map(|m| minijinja::context! { role => m.role.clone(), content => m.content.clone() })
        .collect();
    let limit = TEMPLATE_MAX_OUTPUT + messages_len(messages_in) + bos_token.len() + eos_token.len();
    let mut out = Bounded {
        text: String::new(),
        limit,
    };
    tmpl.render_captured_to(
        minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => bos_token,
            eos_token => eos_token,
        },
        &mut out,
    )
    .map_err(|e| {
        if out.text.len() > limit {
            ModelError::Tokenizer(format!("chat template: its output passed {limit} bytes"))
        } else {
            err(e)
        }
    })?;
    Ok(out.text)
}

fn messages_len(messages: &[Message]) -> usize {
    messages
        .iter()
        .map(|m| m.role.len() + m.content.len())
        .sum()
}

/// A `Write` into a string that fails once it would pass `limit` bytes.
struct Bounded {
    text: String,
    limit: usize,
}

impl std::io::Write for Bounded {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.text.len() + buf.len() > self.limit {
            self.text.push_str(&String::from_utf8_lossy(buf));
            return Err(std::io::Error::other("chat template output too long"));
        }
        // minijinja writes whole UTF-8 strings.
        self.text.push_str(&String::from_utf8_lossy(buf));
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hi() -> Vec<Message> {
        vec![Message {
            role: "user".into(),
            content: "Hi!".into(),
        }]
    }

    #[test]
    fn a_template_that_never_ends_or_floods_fails_quickly() {
        let t0 = std::time::Instant::now();
        for (template, want) in [
            // Nested loops: 10^10 iterations.
            (
                "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
                "fuel",
            ),
            // Recursion without end.
            (
                "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
                "recursion",
            ),
            // A few instructions, a lot of text: 4000 x 8 KiB.
            (
                "{% set s = 'x' * 8192 %}{% for i in range(4000) %}{{ s }}{% endfor %}",
                "bytes",
            ),
            // Files and includes: no loader.
            ("{% include '/etc/passwd' %}", "template"),
        ] {
            let e = render(template, &hi(), true, "<s>", "</s>")
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{template}: {e}");
        }
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(10),
            "{:?}",
            t0.elapsed()
        );
        // A real template still renders.
        let ok = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}";
        assert_eq!(render(ok, &hi(), false, "", "").unwrap(), "<|user|>Hi!");
    }
}
