//! A small YAML writer for the configs stackwarden renders (prometheus.yml, Grafana provisioning):
//! ordered keys, strings JSON-quoted (which YAML reads as is), so output is stable and always parses.

/// A YAML value with ordered keys; strings are written JSON-quoted, which YAML reads as is.
#[derive(Debug, Clone)]
pub enum Yaml {
    Str(String),
    Int(i64),
    Bool(bool),
    List(Vec<Yaml>),
    Map(Vec<(String, Yaml)>),
}

pub fn s(v: impl Into<String>) -> Yaml {
    Yaml::Str(v.into())
}

pub fn map(entries: Vec<(&str, Yaml)>) -> Yaml {
    Yaml::Map(
        entries
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
    )
}

impl Yaml {
    fn scalar(&self) -> Option<String> {
        match self {
            Yaml::Str(t) => Some(serde_json::to_string(t).expect("strings serialize")),
            Yaml::Int(i) => Some(i.to_string()),
            Yaml::Bool(b) => Some(b.to_string()),
            Yaml::List(l) if l.is_empty() => Some("[]".into()),
            Yaml::Map(m) if m.is_empty() => Some("{}".into()),
            _ => None,
        }
    }

    fn key(k: &str) -> String {
        if !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            k.to_string()
        } else {
            serde_json::to_string(k).expect("strings serialize")
        }
    }

    fn write(&self, indent: usize, out: &mut String) {
        let pad = " ".repeat(indent);
        match self {
            Yaml::Map(entries) => {
                for (k, v) in entries {
                    match v.scalar() {
                        Some(text) => out.push_str(&format!("{pad}{}: {text}\n", Yaml::key(k))),
                        None => {
                            out.push_str(&format!("{pad}{}:\n", Yaml::key(k)));
                            v.write(indent + 2, out);
                        }
                    }
                }
            }
            Yaml::List(items) => {
                for item in items {
                    match item.scalar() {
                        Some(text) => out.push_str(&format!("{pad}- {text}\n")),
                        None => {
                            let mut inner = String::new();
                            item.write(indent + 2, &mut inner);
                            out.push_str(&format!("{pad}- {}", &inner[indent + 2..]));
                        }
                    }
                }
            }
            scalar => out.push_str(&format!("{pad}{}\n", scalar.scalar().unwrap_or_default())),
        }
    }

    pub fn to_text(&self) -> String {
        let mut out = String::new();
        self.write(0, &mut out);
        out
    }
}
