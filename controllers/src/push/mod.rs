//! Config pushed to running hosts: a bundle of files with the commands that validate and reload
//! them, turned into one POSIX sh script for SSM Run Command (`AWS-RunShellScript`).
//!
//! The script (`push.sh`) stages the files, validates the staged copy, swaps each live file with
//! a rename beside it, reloads, and puts the previous files back (and reloads again) when the
//! reload fails. Paths are under `$STACKWARDEN_ROOT`, and the commands that check and reload
//! come from the desired state ([`HostCommand`]), so tests run the very same script in a
//! temporary directory against a real Prometheus.
//!
//! This module renders text and computes hashes; `send` is the one place that sends a bundle.

pub mod send;
pub mod yaml;

use std::collections::BTreeMap;

use base64::Engine as _;
use sha2::Digest;

/// The largest script sent in one command. AWS documents one limit that applies, the 64 KB of
/// the document the agent runs (`MaxDocumentSizeExceeded`), of which the script is the
/// `commands` parameter: 60 KiB leaves the rest of the document its room. A bundle over this
/// is refused before anything is sent.
pub const MAX_SCRIPT_BYTES: usize = 60 * 1024;

/// Files for one host role, and how to check and apply them there.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Bundle {
    /// Names the bundle on the host (`prometheus`, `host_config.node_exporter`): its stage,
    /// backup and installed-hash file.
    pub name: String,
    /// Absolute path on the host → content.
    pub files: BTreeMap<String, File>,
    /// Shell commands that validate the staged files; `$stage` prefixes their staged paths.
    pub validate: Vec<String>,
    /// Shell commands that make the running service read the new files, and check it did.
    pub reload: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct File {
    pub content: Content,
    /// Octal, such as `0644`.
    pub mode: String,
}

/// What a pushed file holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content {
    /// These bytes, carried in the script.
    Text(String),
    /// What this command prints on the host: a secret the host reads itself with its instance
    /// role. Only the command (naming the secret and its version) travels and is hashed, so a
    /// rotation changes the hash while the value is in no Run Command parameter, tag or log.
    Fetched(String),
}

impl File {
    pub fn new(content: impl Into<String>) -> File {
        File {
            content: Content::Text(content.into()),
            mode: "0644".into(),
        }
    }

    /// A secret the host fetches with `command`: mode 0600, written under umask 077.
    pub fn fetched(command: impl Into<String>) -> File {
        File {
            content: Content::Fetched(command.into()),
            mode: "0600".into(),
        }
    }

    /// The text carried in the script, or the command that fetches it on the host.
    pub fn text(&self) -> &str {
        match &self.content {
            Content::Text(t) | Content::Fetched(t) => t,
        }
    }
}

/// A bundle ready to send: its script, within the size a command can carry.
#[derive(Clone, PartialEq)]
pub struct Prepared {
    pub name: String,
    pub hash: String,
    pub script: String,
    /// The instance tag recording which version of the bundle an instance installed
    /// ([`hash_tag`] of the name, unless the bundle records per stack).
    pub record: String,
}

/// Name and hash only: operations are logged, and the script is long.
impl std::fmt::Debug for Prepared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.name, self.short_hash())
    }
}

impl Prepared {
    /// The instance tag recording which version of this bundle an instance has.
    pub fn hash_tag(&self) -> String {
        self.record.clone()
    }

    /// `sha256:<first 12 hex digits>`, for plans and logs.
    pub fn short_hash(&self) -> String {
        format!("sha256:{}", &self.hash[..self.hash.len().min(12)])
    }
}

/// The instance tag recording the hash of the bundle `name` an instance has installed
/// (`stackwarden:prometheus`, `stackwarden:grafana`; a host_config records per stack).
pub fn hash_tag(name: &str) -> String {
    format!("stackwarden:{name}")
}

impl Bundle {
    /// The script and hash, refused when the script is over what one command can carry.
    pub fn prepare(&self) -> crate::error::Result<Prepared> {
        let script = self.script();
        if script.len() > MAX_SCRIPT_BYTES {
            return Err(crate::error::Error::Invalid(format!(
                "the {} files make a {} KiB push, over the {} KiB one Run Command can carry; trim or split them",
                self.name,
                script.len() / 1024,
                MAX_SCRIPT_BYTES / 1024
            )));
        }
        Ok(Prepared {
            name: self.name.clone(),
            hash: self.hash(),
            script,
            record: hash_tag(&self.name),
        })
    }

    /// The content hash: files (paths, modes, contents) and commands. What is recorded on the
    /// host and in the instance tag, so an unchanged bundle is never sent again.
    pub fn hash(&self) -> String {
        let mut h = sha2::Sha256::new();
        for (path, f) in &self.files {
            let kind = match f.content {
                Content::Text(_) => "text",
                Content::Fetched(_) => "fetched",
            };
            for part in [path.as_str(), f.mode.as_str(), kind, f.text()] {
                h.update((part.len() as u64).to_le_bytes());
                h.update(part.as_bytes());
            }
        }
        for c in self.validate.iter().chain(&self.reload) {
            h.update((c.len() as u64).to_le_bytes());
            h.update(c.as_bytes());
        }
        hex::encode(h.finalize())
    }

    /// The script that installs the bundle.
    pub fn script(&self) -> String {
        let b64 = base64::engine::general_purpose::STANDARD;
        let files: Vec<String> = self
            .files
            .iter()
            .map(|(path, f)| {
                let text = match &f.content {
                    Content::Fetched(command) => {
                        return format!("fetch {} {} {command}", shell_quote(path), f.mode)
                    }
                    Content::Text(text) => text,
                };
                let encoded = b64.encode(text.as_bytes());
                let lines: Vec<&str> = encoded
                    .as_bytes()
                    .chunks(76)
                    .map(|c| std::str::from_utf8(c).expect("base64 is ASCII"))
                    .collect();
                format!(
                    "put {} {} <<'STACKWARDEN_EOF'\n{}\nSTACKWARDEN_EOF",
                    shell_quote(path),
                    f.mode,
                    lines.join("\n")
                )
            })
            .collect();
        let paths: Vec<String> = self.files.keys().map(|p| shell_quote(p)).collect();
        let indent = |cmds: &[String]| {
            cmds.iter()
                .map(|c| format!("  {c} || return 1"))
                .collect::<Vec<_>>()
                .join("\n")
        };
        include_str!("push.sh")
            .replace("@NAME@", &self.name)
            .replace("@HASH@", &self.hash())
            .replace("@PATHS@", &paths.join(" "))
            .replace("@FILES@", &files.join("\n"))
            .replace("@VALIDATE@", &indent(&self.validate))
            .replace("@RELOAD@", &indent(&self.reload))
    }
}

/// A command the push runs on the host, from the desired state (`promtool`, `reload`, `restart`,
/// ...): one line of POSIX sh, pasted into the script as it is written. What runs the service
/// (a package, `docker`, `podman`) is the host's business; stackwarden only needs the command.
#[derive(Debug, Clone)]
pub struct HostCommand(pub toml::Spanned<String>);

impl<'de> serde::Deserialize<'de> for HostCommand {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        toml::Spanned::<String>::deserialize(d).map(HostCommand)
    }
}

impl HostCommand {
    pub fn as_str(&self) -> &str {
        self.0.get_ref()
    }

    /// Refuses an empty command and one of more than one line: the script runs each command as
    /// one line followed by `|| return 1`, so a second line would escape that check.
    pub fn check(&self, v: &mut crate::desired::Validator<'_>, key: &str) {
        let c = self.as_str();
        if c.trim().is_empty() {
            v.error(
                &self.0.span(),
                format!("`{key}` is empty: give the command, or leave the key out for the default"),
            );
        } else if c.contains(['\n', '\r', '\0']) {
            v.error(&self.0.span(), format!("`{key}` is more than one line: a host command is one line of sh (join commands with `&&`)"));
        }
    }
}

/// Checks each host command of a table given (`keys`: its key and value), named
/// `<table>.<key>` in the errors.
pub fn check_commands(
    v: &mut crate::desired::Validator<'_>,
    table: &str,
    keys: &[(&str, &Option<HostCommand>)],
) {
    for (key, c) in keys {
        if let Some(c) = c {
            c.check(v, &format!("{table}.{key}"));
        }
    }
}

impl HostCommand {
    /// Refuses a URL of another scheme than `schemes` (`http://`, ...), at its value: the push
    /// polls it with curl.
    pub fn check_url(&self, v: &mut crate::desired::Validator<'_>, key: &str, schemes: &[&str]) {
        if !schemes.iter().any(|s| self.as_str().starts_with(s)) {
            let (last, rest) = schemes.split_last().unwrap_or((&"", &[]));
            let schemes = match rest {
                [] => last.to_string(),
                _ => format!("{} or {last}", rest.join(", ")),
            };
            v.error(
                &self.0.span(),
                format!(
                    "{key} `{}` is not a URL starting with {}",
                    self.as_str(),
                    schemes
                ),
            );
        }
    }
}

/// The command a key names, or its default.
pub fn command_or<'a>(c: &'a Option<HostCommand>, default: &'a str) -> &'a str {
    c.as_ref().map_or(default, HostCommand::as_str)
}

/// Quotes a word for POSIX sh.
pub fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-+=:@,".contains(c))
    {
        return s.to_string();
    }
    format!("'{}'", s.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bundle() -> Bundle {
        Bundle {
            name: "demo".into(),
            files: BTreeMap::from([
                ("/etc/demo/a.conf".into(), File::new("x = 1\n")),
                (
                    "/etc/demo/it's.conf".into(),
                    File::new("héllo 'quoted' $HOME\n"),
                ),
            ]),
            validate: vec!["test -s \"$stage/etc/demo/a.conf\"".into()],
            reload: vec!["true".into()],
        }
    }

    #[test]
    fn the_hash_follows_every_part() {
        let a = bundle();
        let mut b = bundle();
        assert_eq!(a.hash(), b.hash());
        b.reload.push("systemctl reload demo".into());
        assert_ne!(a.hash(), b.hash());
        let mut c = bundle();
        c.files.get_mut("/etc/demo/a.conf").unwrap().mode = "0600".into();
        assert_ne!(a.hash(), c.hash());
    }

    #[test]
    fn the_script_installs_exact_bytes_under_the_root() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let out = crate::testing::run_as_agent(&bundle().script(), dir);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = std::fs::read_to_string(dir.join("etc/demo/it's.conf")).unwrap();
        assert_eq!(text, "héllo 'quoted' $HOME\n");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.contains(&format!("installed demo sha256:{}", bundle().hash())));
        let recorded =
            std::fs::read_to_string(dir.join("var/lib/stackwarden/demo.sha256")).unwrap();
        assert_eq!(recorded.trim(), bundle().hash());
    }

    #[test]
    fn a_failed_reload_puts_the_previous_files_back() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        std::fs::create_dir_all(dir.join("etc/demo")).unwrap();
        std::fs::write(dir.join("etc/demo/a.conf"), "old\n").unwrap();
        let mut b = bundle();
        b.reload = vec!["grep -q old \"$STACKWARDEN_ROOT/etc/demo/a.conf\"".into()];
        let out = crate::testing::run_as_agent(&b.script(), dir);
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("reload failed; the previous files are back"),
            "{stderr}"
        );
        assert_eq!(
            std::fs::read_to_string(dir.join("etc/demo/a.conf")).unwrap(),
            "old\n"
        );
        assert!(
            !dir.join("etc/demo/it's.conf").exists(),
            "a file the push added is removed"
        );
    }

    #[test]
    fn a_failed_validation_installs_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let mut b = bundle();
        b.validate = vec!["echo 'line 3: bad' >&2; false".into()];
        let out = crate::testing::run_as_agent(&b.script(), dir);
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("validation failed; nothing was installed"),
            "{stderr}"
        );
        assert!(stderr.contains("line 3: bad"), "{stderr}");
        assert!(!dir.join("etc/demo/a.conf").exists());
    }
}
