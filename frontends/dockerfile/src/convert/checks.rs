//! Build checks (lint rules) run while converting.

use super::*;

impl Ctx<'_> {
    /// Lint rules that look at one instruction without running anything.
    pub(super) fn check_instruction(&mut self, st: &StageState, node: &Node) {
        let line = node.start_line;
        let kw = node.keyword.as_str();
        if (kw == "env" || kw == "label") && node.args.len() == 3 && node.args[2].is_empty() {
            let up = kw.to_uppercase();
            self.warn(
                "LegacyKeyValueFormat",
                &format!(
                    "\"{up} key=value\" should be used instead of legacy \"{up} key value\" format"
                ),
                line,
            );
        }
        if kw == "expose" {
            for a in &node.args {
                if let Some((_, proto)) = a.split_once('/')
                    && proto != proto.to_lowercase()
                {
                    self.warn(
                        "ExposeProtoCasing",
                        &format!(
                            "Defined protocol '{a}' in EXPOSE instruction should be lowercase"
                        ),
                        line,
                    );
                }
                if a.contains(':') {
                    self.warn("ExposeInvalidFormat", &format!("EXPOSE instruction should not define an IP address or host-port mapping, found '{a}'"), line);
                }
            }
        }
        // Variables the builder expands itself that nothing defines.
        let expands = matches!(
            kw,
            "env"
                | "label"
                | "workdir"
                | "user"
                | "expose"
                | "volume"
                | "stopsignal"
                | "copy"
                | "add"
        );
        if expands {
            let env = st.expansion_env();
            let declared: Vec<&String> = st.args.iter().map(|(k, _)| k).collect();
            let texts: Vec<&String> = if kw == "env" || kw == "label" {
                node.args.chunks(3).filter_map(|c| c.get(1)).collect()
            } else {
                node.args.iter().collect()
            };
            for t in texts {
                if let Ok(x) = self.lex.process(t, &env) {
                    for name in x.unmatched {
                        if !declared.contains(&&name) && !PROXY_ARGS.contains(&name.as_str()) {
                            self.warn(
                                "UndefinedVar",
                                &format!("Usage of undefined variable '${name}'"),
                                line,
                            );
                        }
                    }
                }
            }
        }
    }

    pub(super) fn warn(&mut self, rule: &str, message: &str, line: usize) {
        self.warnings.push(BuildWarning {
            rule: rule.into(),
            message: message.into(),
            line,
        });
    }
}

pub(super) fn is_secret_name(name: &str) -> bool {
    let l = name.to_lowercase();
    [
        "password",
        "passwd",
        "secret",
        "token",
        "apikey",
        "api_key",
        "access_key",
    ]
    .iter()
    .any(|s| l.contains(s))
}
