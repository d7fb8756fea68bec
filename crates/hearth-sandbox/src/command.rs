//! How `docker run` habits turn an image's config and the user's options into one concrete command:
//! argv from Entrypoint and Cmd, environment, working directory and user. Pure logic, no I/O.

use thiserror::Error;

/// The parts of an OCI image config that decide what runs (its `config` object).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageDefaults {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
    pub working_dir: Option<String>,
    pub user: Option<String>,
}

impl From<&hearth_image::ImageConfig> for ImageDefaults {
    fn from(c: &hearth_image::ImageConfig) -> Self {
        ImageDefaults {
            entrypoint: c.entrypoint.clone(),
            cmd: c.cmd.clone(),
            env: c.env.clone(),
            working_dir: c.working_dir.clone(),
            user: c.user.clone(),
        }
    }
}

/// What the user asked for on top of the image.
#[derive(Debug, Clone, Default)]
pub struct CommandOverrides {
    /// The positional COMMAND [ARG...]; replaces the image's Cmd when non-empty.
    pub command: Vec<String>,
    /// `--entrypoint`: replaces the image's Entrypoint (an empty string clears it).
    pub entrypoint: Option<String>,
    /// `-e KEY=VALUE` or `-e KEY` (take the value from `host_env`).
    pub env: Vec<String>,
    /// `-w`.
    pub working_dir: Option<String>,
    /// `-u user[:group]`.
    pub user: Option<String>,
}

/// A fully resolved command, ready for the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedCommand {
    pub argv: Vec<String>,
    /// `KEY=VALUE`, image values first, overridden by the user's, each key once.
    pub env: Vec<String>,
    pub working_dir: String,
    pub user: String,
}

impl ResolvedCommand {
    /// The agent request that runs this command: with `stdin` the command's stdin stays open for
    /// the caller; `timeout` kills its whole process tree (rounded up to whole milliseconds).
    pub fn into_request(
        self,
        stdin: bool,
        timeout: Option<std::time::Duration>,
    ) -> hearth_vm::channel::ExecRequest {
        hearth_vm::channel::ExecRequest {
            argv: self.argv,
            env: self.env,
            cwd: Some(self.working_dir),
            user: Some(self.user),
            stdin,
            timeout_ms: timeout.map(|t| t.as_millis().max(1) as u64),
            tty: None,
            attachable: false,
            label: None,
        }
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum CommandError {
    #[error("no command: the image has no Entrypoint or Cmd, so give one after the image name")]
    NoCommand,
    #[error("invalid environment variable {0:?}: expected KEY=VALUE or KEY, and KEY may not be empty or contain '='")]
    BadEnv(String),
    #[error("working directory {0:?} must be an absolute path")]
    RelativeWorkdir(String),
}

const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Resolves the command the way `docker run` does. `host_env` answers `-e KEY` without a value.
pub fn resolve(
    image: &ImageDefaults,
    over: &CommandOverrides,
    host_env: impl Fn(&str) -> Option<String>,
) -> Result<ResolvedCommand, CommandError> {
    let entrypoint = match &over.entrypoint {
        Some(e) if e.is_empty() => Vec::new(),
        Some(e) => vec![e.clone()],
        None => image.entrypoint.clone(),
    };
    // Docker drops the image's Cmd when --entrypoint is given.
    let cmd = if !over.command.is_empty() {
        over.command.clone()
    } else if over.entrypoint.is_some() {
        Vec::new()
    } else {
        image.cmd.clone()
    };
    let argv: Vec<String> = entrypoint.into_iter().chain(cmd).collect();
    if argv.is_empty() {
        return Err(CommandError::NoCommand);
    }

    let mut env: Vec<String> = Vec::new();
    let mut set = |entry: String| {
        let key_len = entry.find('=').unwrap_or(entry.len());
        env.retain(|e| e.find('=').map(|i| &e[..i]) != Some(&entry[..key_len]));
        env.push(entry);
    };
    if !image.env.iter().any(|e| e.starts_with("PATH=")) {
        set(DEFAULT_PATH.to_string());
    }
    for entry in &image.env {
        set(entry.clone());
    }
    for entry in &over.env {
        match entry.split_once('=') {
            Some((key, _)) if !key.is_empty() => set(entry.clone()),
            None if !entry.is_empty() => {
                if let Some(value) = host_env(entry) {
                    set(format!("{entry}={value}"));
                }
            }
            _ => return Err(CommandError::BadEnv(entry.clone())),
        }
    }

    let working_dir = over
        .working_dir
        .clone()
        .or_else(|| image.working_dir.clone().filter(|w| !w.is_empty()))
        .unwrap_or_else(|| "/".to_string());
    if !working_dir.starts_with('/') {
        return Err(CommandError::RelativeWorkdir(working_dir));
    }
    let user = over
        .user
        .clone()
        .or_else(|| image.user.clone().filter(|u| !u.is_empty()))
        .unwrap_or_else(|| "root".to_string());
    Ok(ResolvedCommand {
        argv,
        env,
        working_dir,
        user,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image() -> ImageDefaults {
        ImageDefaults {
            entrypoint: vec!["/entry".into()],
            cmd: vec!["default".into()],
            env: vec!["PATH=/img/bin".into(), "A=1".into()],
            working_dir: Some("/app".into()),
            user: Some("nobody".into()),
        }
    }

    fn no_host(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn image_defaults_apply_when_nothing_is_overridden() {
        let r = resolve(&image(), &CommandOverrides::default(), no_host).unwrap();
        assert_eq!(r.argv, ["/entry", "default"]);
        assert_eq!(r.env, ["PATH=/img/bin", "A=1"]);
        assert_eq!(r.working_dir, "/app");
        assert_eq!(r.user, "nobody");
    }

    #[test]
    fn command_replaces_cmd_but_keeps_entrypoint() {
        let over = CommandOverrides {
            command: vec!["x".into(), "y".into()],
            ..Default::default()
        };
        assert_eq!(
            resolve(&image(), &over, no_host).unwrap().argv,
            ["/entry", "x", "y"]
        );
    }

    #[test]
    fn entrypoint_override_drops_image_cmd() {
        let over = CommandOverrides {
            entrypoint: Some("/bin/sh".into()),
            ..Default::default()
        };
        assert_eq!(resolve(&image(), &over, no_host).unwrap().argv, ["/bin/sh"]);
        let cleared = CommandOverrides {
            entrypoint: Some(String::new()),
            command: vec!["ls".into()],
            ..Default::default()
        };
        assert_eq!(resolve(&image(), &cleared, no_host).unwrap().argv, ["ls"]);
    }

    #[test]
    fn user_env_overrides_image_env_and_takes_host_values() {
        let over = CommandOverrides {
            env: vec!["A=2".into(), "HOME_VAR".into(), "UNSET".into()],
            ..Default::default()
        };
        let host = |k: &str| (k == "HOME_VAR").then(|| "from-host".to_string());
        let r = resolve(&image(), &over, host).unwrap();
        assert_eq!(r.env, ["PATH=/img/bin", "A=2", "HOME_VAR=from-host"]);
    }

    #[test]
    fn default_path_when_image_has_none() {
        let r = resolve(
            &ImageDefaults {
                cmd: vec!["true".into()],
                ..Default::default()
            },
            &CommandOverrides::default(),
            no_host,
        )
        .unwrap();
        assert_eq!(r.env, [DEFAULT_PATH]);
        assert_eq!((r.working_dir.as_str(), r.user.as_str()), ("/", "root"));
    }

    #[test]
    fn errors_are_clear() {
        let empty = ImageDefaults::default();
        assert_eq!(
            resolve(&empty, &CommandOverrides::default(), no_host),
            Err(CommandError::NoCommand)
        );
        let bad = CommandOverrides {
            env: vec!["=x".into()],
            ..Default::default()
        };
        assert_eq!(
            resolve(&image(), &bad, no_host),
            Err(CommandError::BadEnv("=x".into()))
        );
        let rel = CommandOverrides {
            working_dir: Some("rel".into()),
            ..Default::default()
        };
        assert_eq!(
            resolve(&image(), &rel, no_host),
            Err(CommandError::RelativeWorkdir("rel".into()))
        );
    }
}
