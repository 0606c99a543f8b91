//! Where S3 credentials come from: the AWS SDKs' default chain, in their order.
//!
//! 1. The environment: `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`.
//! 2. The shared files, for the profile `AWS_PROFILE` (else `default`):
//!    `AWS_SHARED_CREDENTIALS_FILE` (else `~/.aws/credentials`) and `AWS_CONFIG_FILE` (else
//!    `~/.aws/config`, where profiles are `[profile NAME]`): the profile's keys (the
//!    credentials file wins over the config file), else its `credential_process`, else its
//!    `web_identity_token_file` with `role_arn`. A profile that assumes a role from another
//!    profile (`source_profile`) or uses SSO is refused with a message saying so. The
//!    profile's `region` is the region when `AWS_REGION` and `AWS_DEFAULT_REGION` are unset.
//! 3. Web identity (EKS IRSA): `AWS_WEB_IDENTITY_TOKEN_FILE` and `AWS_ROLE_ARN`
//!    (`AWS_ROLE_SESSION_NAME` optional), exchanged with STS AssumeRoleWithWebIdentity
//!    (`AWS_ENDPOINT_URL_STS` overrides STS's regional endpoint).
//! 4. Container credentials (ECS, EKS Pod Identity): `AWS_CONTAINER_CREDENTIALS_RELATIVE_URI`
//!    or `AWS_CONTAINER_CREDENTIALS_FULL_URI`, with `AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE`
//!    (read at each fetch) or `AWS_CONTAINER_AUTHORIZATION_TOKEN`.
//! 5. The EC2 instance role, through IMDSv2 (a session token first), unless
//!    `AWS_EC2_METADATA_DISABLED=true`; `AWS_EC2_METADATA_SERVICE_ENDPOINT` overrides its
//!    address.
//!
//! Temporary credentials (2 to 5) carry an expiry; [`super::s3::S3Storage`] fetches them again
//! before it. Nothing here ever prints a secret: [`Fetched`]'s `Debug` hides them, and errors
//! name the source and what failed (for STS, its error code and message), never the keys.
//!
//! This file follows the chain ([`resolve`]), reading variables and files only; asking a
//! [`Source`] for keys, which runs a command or asks a server, is in `fetch`
//! ([`Source::fetch`]).

use std::fmt;
use std::path::{Path, PathBuf};

use crate::error::{Error, ErrorKind, Result};
use crate::utc::UtcTime;

mod fetch;

/// Keys as a source gave them.
#[derive(Clone, PartialEq, Eq)]
pub struct Fetched {
    pub key: String,
    pub secret: String,
    pub token: Option<String>,
    /// When they stop working; `None` for keys that do not expire.
    pub expires: Option<UtcTime>,
}

impl fmt::Debug for Fetched {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Fetched")
            .field("key", &self.key)
            .field("secret", &"<redacted>")
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("expires", &self.expires)
            .finish()
    }
}

/// A source of keys that can be asked again (the temporary ones).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A profile's `credential_process`: a command that prints the keys as JSON.
    Process { profile: String, command: String },
    /// STS AssumeRoleWithWebIdentity with the token in `token_file`.
    WebIdentity {
        token_file: PathBuf,
        role_arn: String,
        session_name: String,
        /// STS's URL, e.g. `https://sts.eu-west-1.amazonaws.com/`.
        sts: String,
    },
    /// The ECS/EKS container credentials endpoint.
    Container {
        url: String,
        token: Option<String>,
        token_file: Option<PathBuf>,
    },
    /// The EC2 instance metadata service, IMDSv2.
    Imds { endpoint: String },
}

/// What the chain found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// Keys known now (the environment's, a profile's); `None` when `source` must be asked.
    pub keys: Option<Fetched>,
    /// Where to ask for (new) keys; `None` for keys that never change.
    pub source: Option<Source>,
    /// Where the keys come from, for the log line at start and for messages.
    pub origin: String,
    /// The profile's `region`, if it has one.
    pub profile_region: Option<String>,
}

const ECS_HOST: &str = "http://169.254.170.2";
const IMDS_ENDPOINT: &str = "http://169.254.169.254";

/// Follow the chain with the variables `var` gives (empty ones count as unset; `HOME` among
/// them, for `~`), `region` being the region when none is set. Reads files but asks no
/// server and runs no command: the first fetch of a [`Source`] is the caller's.
pub fn resolve(var: &dyn Fn(&str) -> Option<String>, region: &str) -> Result<Resolved> {
    let var = |name: &str| var(name).filter(|v| !v.is_empty());
    // 1. The environment.
    match (var("AWS_ACCESS_KEY_ID"), var("AWS_SECRET_ACCESS_KEY")) {
        (Some(key), Some(secret)) => {
            return Ok(Resolved {
                keys: Some(Fetched {
                    key,
                    secret,
                    token: var("AWS_SESSION_TOKEN"),
                    expires: None,
                }),
                source: None,
                origin: "the environment (AWS_ACCESS_KEY_ID)".to_string(),
                profile_region: None,
            });
        }
        (Some(_), None) | (None, Some(_)) => {
            return Err(Error::invalid(
                "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY must be set together (only one is)",
            ));
        }
        (None, None) => {}
    }

    // 2. The shared files.
    let home = var("HOME").map(PathBuf::from);
    let file = |name: &str, default: &str| {
        var(name)
            .map(PathBuf::from)
            .or_else(|| home.as_ref().map(|h| h.join(default)))
    };
    let credentials_file = file("AWS_SHARED_CREDENTIALS_FILE", ".aws/credentials");
    let config_file = file("AWS_CONFIG_FILE", ".aws/config");
    let explicit_profile = var("AWS_PROFILE").or_else(|| var("AWS_DEFAULT_PROFILE"));
    let profile_name = explicit_profile
        .clone()
        .unwrap_or_else(|| "default".to_string());
    let from_credentials = match &credentials_file {
        Some(path) => read_profile(path, &profile_name, false)?,
        None => None,
    };
    let from_config = match &config_file {
        Some(path) => read_profile(path, &profile_name, true)?,
        None => None,
    };
    if from_credentials.is_none() && from_config.is_none() && explicit_profile.is_some() {
        let files: Vec<String> = [&credentials_file, &config_file]
            .into_iter()
            .flatten()
            .map(|p| p.display().to_string())
            .collect();
        return Err(Error::invalid(format!(
            "AWS_PROFILE={profile_name}: no such profile in {}",
            files.join(" or ")
        )));
    }
    if from_credentials.is_some() || from_config.is_some() {
        let setting = |name: &str| -> Option<(String, PathBuf)> {
            let look = |found: &Option<Vec<(String, String)>>, path: &Option<PathBuf>| {
                let value = found
                    .as_ref()?
                    .iter()
                    .find(|(k, _)| k == name)
                    .map(|(_, v)| v.clone())
                    .filter(|v| !v.is_empty())?;
                Some((value, path.clone()?))
            };
            look(&from_credentials, &credentials_file).or_else(|| look(&from_config, &config_file))
        };
        let profile_region = setting("region").map(|(r, _)| r);
        let region = var("AWS_REGION")
            .or_else(|| var("AWS_DEFAULT_REGION"))
            .or_else(|| profile_region.clone())
            .unwrap_or_else(|| region.to_string());
        if let (Some((key, path)), Some((secret, _))) = (
            setting("aws_access_key_id"),
            setting("aws_secret_access_key"),
        ) {
            return Ok(Resolved {
                keys: Some(Fetched {
                    key,
                    secret,
                    token: setting("aws_session_token").map(|(t, _)| t),
                    expires: None,
                }),
                source: None,
                origin: format!("profile {profile_name:?} in {}", path.display()),
                profile_region,
            });
        }
        if let Some((command, path)) = setting("credential_process") {
            return Ok(Resolved {
                keys: None,
                origin: format!(
                    "the credential_process of profile {profile_name:?} in {}",
                    path.display()
                ),
                source: Some(Source::Process {
                    profile: profile_name,
                    command,
                }),
                profile_region,
            });
        }
        if let (Some((token_file, path)), Some((role_arn, _))) =
            (setting("web_identity_token_file"), setting("role_arn"))
        {
            let session_name = setting("role_session_name").map(|(n, _)| n);
            return Ok(Resolved {
                keys: None,
                origin: format!(
                    "web identity of profile {profile_name:?} in {} (role {role_arn})",
                    path.display()
                ),
                source: Some(web_identity(
                    token_file.into(),
                    role_arn,
                    session_name,
                    &var,
                    &region,
                )),
                profile_region,
            });
        }
        for unsupported in ["role_arn", "source_profile", "sso_session", "sso_start_url"] {
            if let Some((_, path)) = setting(unsupported) {
                return Err(Error::invalid(format!(
                    "profile {profile_name:?} in {} uses {unsupported}, which walsync does not \
                     support (it reads keys, credential_process and web_identity_token_file): \
                     export keys instead, e.g. eval \"$(aws configure export-credentials \
                     --profile {profile_name} --format env)\"",
                    path.display()
                )));
            }
        }
        if explicit_profile.is_some() {
            return Err(Error::invalid(format!(
                "AWS_PROFILE={profile_name}: the profile has no aws_access_key_id and \
                 aws_secret_access_key, credential_process or web_identity_token_file"
            )));
        }
    }
    let region = var("AWS_REGION")
        .or_else(|| var("AWS_DEFAULT_REGION"))
        .unwrap_or_else(|| region.to_string());

    // 3. Web identity.
    if let (Some(token_file), Some(role_arn)) =
        (var("AWS_WEB_IDENTITY_TOKEN_FILE"), var("AWS_ROLE_ARN"))
    {
        return Ok(Resolved {
            keys: None,
            origin: format!("web identity (AWS_WEB_IDENTITY_TOKEN_FILE, role {role_arn})"),
            source: Some(web_identity(
                token_file.into(),
                role_arn,
                var("AWS_ROLE_SESSION_NAME"),
                &var,
                &region,
            )),
            profile_region: None,
        });
    }

    // 4. Container credentials.
    let container_url = var("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI")
        .map(|relative| format!("{ECS_HOST}{relative}"))
        .or_else(|| var("AWS_CONTAINER_CREDENTIALS_FULL_URI"));
    if let Some(url) = container_url {
        return Ok(Resolved {
            keys: None,
            origin: format!("the container credentials endpoint {url}"),
            source: Some(Source::Container {
                url,
                token: var("AWS_CONTAINER_AUTHORIZATION_TOKEN"),
                token_file: var("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE").map(PathBuf::from),
            }),
            profile_region: None,
        });
    }

    // 5. The instance role.
    if var("AWS_EC2_METADATA_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
        return Err(Error::invalid(
            "no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE \
             (shared files), or run where container or web identity credentials are provided \
             (AWS_EC2_METADATA_DISABLED=true rules out the instance role)",
        ));
    }
    let endpoint = var("AWS_EC2_METADATA_SERVICE_ENDPOINT")
        .unwrap_or_else(|| IMDS_ENDPOINT.to_string())
        .trim_end_matches('/')
        .to_string();
    Ok(Resolved {
        keys: None,
        origin: format!("the EC2 instance role (IMDSv2 at {endpoint})"),
        source: Some(Source::Imds { endpoint }),
        profile_region: None,
    })
}

fn web_identity(
    token_file: PathBuf,
    role_arn: String,
    session_name: Option<String>,
    var: &dyn Fn(&str) -> Option<String>,
    region: &str,
) -> Source {
    let sts = var("AWS_ENDPOINT_URL_STS").unwrap_or_else(|| {
        if region.starts_with("cn-") {
            format!("https://sts.{region}.amazonaws.com.cn")
        } else {
            format!("https://sts.{region}.amazonaws.com")
        }
    });
    let session_name =
        session_name.unwrap_or_else(|| format!("walsync-{}", UtcTime::now().millis() / 1000));
    Source::WebIdentity {
        token_file,
        role_arn,
        session_name,
        sts,
    }
}

/// The settings of `profile` in the INI file at `path` (`[profile NAME]` or `[NAME]` in the
/// config file, `[NAME]` in the credentials file); `None` if the file or the profile is not
/// there. Keys are lowercased; indented lines (sub-sections such as `s3 =`) are skipped.
fn read_profile(path: &Path, profile: &str, config: bool) -> Result<Option<Vec<(String, String)>>> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(Error::new(
                ErrorKind::Io,
                format!("reading the AWS shared file {}: {e}", path.display()),
            ))
        }
    };
    let mut found: Option<Vec<(String, String)>> = None;
    let mut in_profile = false;
    for line in text.lines() {
        if line.starts_with([' ', '\t']) {
            continue;
        }
        let line = line.trim();
        if line.is_empty() || line.starts_with(['#', ';']) {
            continue;
        }
        if let Some(section) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            let section = section.trim();
            let name = if config {
                match section.strip_prefix("profile ") {
                    Some(name) => name.trim(),
                    None if section == "default" => section,
                    None => "",
                }
            } else {
                section
            };
            in_profile = name == profile;
            if in_profile && found.is_none() {
                found = Some(Vec::new());
            }
            continue;
        }
        if !in_profile {
            continue;
        }
        if let Some((key, value)) = line.split_once('=') {
            if let Some(settings) = found.as_mut() {
                settings.push((key.trim().to_ascii_lowercase(), value.trim().to_string()));
            }
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(list: Vec<(&'static str, String)>) -> impl Fn(&str) -> Option<String> {
        move |name| {
            list.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.clone())
        }
    }

    #[test]
    fn the_environment_comes_first() {
        let r = resolve(
            &vars(vec![
                ("AWS_ACCESS_KEY_ID", "AKID".into()),
                ("AWS_SECRET_ACCESS_KEY", "secret".into()),
                ("AWS_SESSION_TOKEN", "tok".into()),
                ("AWS_PROFILE", "nonexistent".into()),
            ]),
            "us-east-1",
        )
        .unwrap();
        let keys = r.keys.unwrap();
        assert_eq!(
            (keys.key.as_str(), keys.token.as_deref()),
            ("AKID", Some("tok"))
        );
        assert_eq!(r.source, None);
        assert_eq!(r.origin, "the environment (AWS_ACCESS_KEY_ID)");
        let err = resolve(
            &vars(vec![("AWS_ACCESS_KEY_ID", "AKID".into())]),
            "us-east-1",
        )
        .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Invalid);
    }

    #[test]
    fn profiles_from_both_files_with_the_credentials_file_first() {
        let dir = tempfile::tempdir().unwrap();
        let credentials = dir.path().join("credentials");
        let config = dir.path().join("config");
        std::fs::write(
            &credentials,
            "# keys\n[default]\naws_access_key_id = DEFAULTKEY\naws_secret_access_key = d-secret\n\n\
             [prod]\naws_access_key_id=PRODKEY\naws_secret_access_key = p-secret\n",
        )
        .unwrap();
        std::fs::write(
            &config,
            "[default]\nregion = eu-west-3\n[profile prod]\nregion = ap-south-1\n\
             aws_access_key_id = IGNORED\ns3 =\n  addressing_style = path\n\
             [profile tool]\ncredential_process = /usr/bin/get-keys --for walsync\n\
             [profile role]\nrole_arn = arn:aws:iam::1:role/r\nsource_profile = prod\n\
             [profile irsa]\nrole_arn = arn:aws:iam::1:role/w\nweb_identity_token_file = /t\n\
             [profile empty]\nregion = us-west-2\n",
        )
        .unwrap();
        let home = dir.path().join("home");
        let with = |profile: Option<&str>| {
            let mut list = vec![
                (
                    "AWS_SHARED_CREDENTIALS_FILE",
                    credentials.display().to_string(),
                ),
                ("AWS_CONFIG_FILE", config.display().to_string()),
                ("HOME", home.display().to_string()),
            ];
            if let Some(profile) = profile {
                list.push(("AWS_PROFILE", profile.to_string()));
            }
            resolve(&vars(list), "us-east-1")
        };
        let r = with(None).unwrap();
        assert_eq!(r.keys.as_ref().unwrap().key, "DEFAULTKEY");
        assert_eq!(r.profile_region.as_deref(), Some("eu-west-3"));
        assert_eq!(
            r.origin,
            format!("profile \"default\" in {}", credentials.display())
        );
        let r = with(Some("prod")).unwrap();
        let keys = r.keys.unwrap();
        assert_eq!(
            (keys.key.as_str(), keys.secret.as_str()),
            ("PRODKEY", "p-secret")
        );
        assert_eq!(r.profile_region.as_deref(), Some("ap-south-1"));
        let r = with(Some("tool")).unwrap();
        assert_eq!(r.keys, None);
        assert_eq!(
            r.source,
            Some(Source::Process {
                profile: "tool".into(),
                command: "/usr/bin/get-keys --for walsync".into()
            })
        );
        let r = with(Some("irsa")).unwrap();
        assert!(
            matches!(&r.source, Some(Source::WebIdentity { role_arn, sts, .. })
                if role_arn == "arn:aws:iam::1:role/w" && sts == "https://sts.us-east-1.amazonaws.com"),
            "{r:?}"
        );
        let err = with(Some("role")).unwrap_err().to_string();
        assert!(
            err.contains("uses role_arn, which walsync does not support"),
            "{err}"
        );
        let err = with(Some("empty")).unwrap_err().to_string();
        assert!(
            err.starts_with("AWS_PROFILE=empty: the profile has no"),
            "{err}"
        );
        let err = with(Some("missing")).unwrap_err().to_string();
        assert_eq!(
            err,
            format!(
                "AWS_PROFILE=missing: no such profile in {} or {}",
                credentials.display(),
                config.display()
            )
        );
    }

    #[test]
    fn then_web_identity_container_and_instance_role() {
        let r = resolve(
            &vars(vec![
                ("AWS_WEB_IDENTITY_TOKEN_FILE", "/var/run/token".into()),
                ("AWS_ROLE_ARN", "arn:aws:iam::1:role/x".into()),
                ("AWS_ROLE_SESSION_NAME", "s".into()),
                ("AWS_REGION", "cn-north-1".into()),
                ("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "/v2/creds".into()),
            ]),
            "us-east-1",
        )
        .unwrap();
        assert_eq!(
            r.source,
            Some(Source::WebIdentity {
                token_file: "/var/run/token".into(),
                role_arn: "arn:aws:iam::1:role/x".into(),
                session_name: "s".into(),
                sts: "https://sts.cn-north-1.amazonaws.com.cn".into()
            })
        );
        let r = resolve(
            &vars(vec![
                ("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "/v2/creds".into()),
                ("AWS_CONTAINER_AUTHORIZATION_TOKEN", "t".into()),
            ]),
            "us-east-1",
        )
        .unwrap();
        assert_eq!(
            r.source,
            Some(Source::Container {
                url: "http://169.254.170.2/v2/creds".into(),
                token: Some("t".into()),
                token_file: None
            })
        );
        let r = resolve(&vars(vec![]), "us-east-1").unwrap();
        assert_eq!(
            r.source,
            Some(Source::Imds {
                endpoint: "http://169.254.169.254".into()
            })
        );
        let err = resolve(
            &vars(vec![("AWS_EC2_METADATA_DISABLED", "true".into())]),
            "us-east-1",
        )
        .unwrap_err();
        assert!(err
            .to_string()
            .starts_with("no S3 credentials: set AWS_ACCESS_KEY_ID"));
    }
}
