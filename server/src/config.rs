//! The server's configuration, in the original BACKER format: `server.toml`
//! with `[server]`, `[repository]` and `[clients]`, and a clients directory
//! holding `clients.toml`, `backups.toml` and `schedules.toml`. Every error
//! names the file, the key and what to do.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use backer_repo::retention::{RetentionPolicy, parse_duration};
use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("failed to read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("{path}: {key}: {problem}; {fix}")]
    Invalid {
        path: PathBuf,
        key: String,
        problem: String,
        fix: String,
    },
}

fn invalid(
    path: &Path,
    key: impl Into<String>,
    problem: impl Into<String>,
    fix: impl Into<String>,
) -> ConfigError {
    ConfigError::Invalid {
        path: path.to_path_buf(),
        key: key.into(),
        problem: problem.into(),
        fix: fix.into(),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServerFile {
    server: RawServer,
    repository: RawRepository,
    clients: RawClientsRef,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "PascalCase")]
struct RawServer {
    mgmt_port: Option<u16>,
    data_port: Option<u16>,
    rest_api_port: Option<u16>,
    log_output: Option<String>,
    debug: Option<bool>,
    external_name: Option<String>,
    external_port: Option<u16>,
    data_transfer_interface: Option<String>,
    login: Option<String>,
    password: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "PascalCase")]
struct RawRepository {
    localization: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "PascalCase")]
struct RawClientsRef {
    config_file: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "PascalCase")]
struct RawClient {
    #[serde(rename = "IPAddress")]
    ip_address: Option<String>,
    #[serde(rename = "BackupsIDs", default)]
    backups_ids: Vec<u32>,
    #[serde(rename = "SchedulesIDs", default)]
    schedules_ids: Vec<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "PascalCase")]
struct RawBackup {
    #[serde(rename = "ID")]
    id: u32,
    description: Option<String>,
    paths: Vec<String>,
    #[serde(default)]
    excluded: Vec<String>,
    retention: Option<toml::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "PascalCase")]
struct RawSchedule {
    #[serde(rename = "ID")]
    id: u32,
    description: Option<String>,
    frequency: String,
    hour: Option<String>,
    day: Option<toml::Value>,
    month: Option<u32>,
}

/// The whole configuration, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub mgmt_port: u16,
    pub data_port: u16,
    pub rest_api_port: u16,
    pub log_output: String,
    pub debug: bool,
    pub external_name: String,
    /// The data port as agents dial it, when that is not `data_port` (a
    /// NodePort or a load balancer in front of the server).
    pub external_port: Option<u16>,
    pub listen_address: String,
    pub login: Option<(String, String)>,
    /// Repository location (path, file:// or s3:// URL).
    pub repository: String,
    pub clients_dir: PathBuf,
    pub clients: BTreeMap<String, ClientDef>,
    pub backups: BTreeMap<u32, BackupDef>,
    pub schedules: BTreeMap<u32, ScheduleDef>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ClientDef {
    pub name: String,
    pub ip_address: Option<String>,
    pub backups: Vec<u32>,
    pub schedules: Vec<u32>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct BackupDef {
    pub id: u32,
    pub name: String,
    pub description: String,
    pub paths: Vec<String>,
    pub excluded: Vec<String>,
    pub retention: Option<RetentionPolicy>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ScheduleDef {
    pub id: u32,
    pub name: String,
    pub description: String,
    pub when: crate::schedule::When,
}

fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
        path: path.to_path_buf(),
        source: e,
    })
}

fn parse<T: serde::de::DeserializeOwned>(path: &Path, text: &str) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|e| ConfigError::Syntax {
        path: path.to_path_buf(),
        message: e.to_string().trim().replace('\n', " "),
    })
}

impl Config {
    /// Reads `server.toml` and the client files it points to.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let raw: RawServerFile = parse(path, &read(path)?)?;
        let s = raw.server;
        let external_name = s.external_name.unwrap_or_default();
        if external_name.trim().is_empty() {
            return Err(invalid(
                path,
                "[server] ExternalName",
                "is missing or empty",
                "set it to the name agents use to reach this server (it goes into the server's certificate)",
            ));
        }
        let login = match (s.login, s.password) {
            (Some(l), Some(p)) if !l.is_empty() && !p.is_empty() => Some((l, p)),
            (None, None) => None,
            _ => {
                return Err(invalid(
                    path,
                    "[server] Login/Password",
                    "only one of them is set, or one is empty",
                    "set both (admin login for the management interface) or neither (admin certificate only)",
                ));
            }
        };
        let ports = [
            ("MgmtPort", s.mgmt_port.unwrap_or(8090)),
            ("DataPort", s.data_port.unwrap_or(8000)),
            ("RestApiPort", s.rest_api_port.unwrap_or(8080)),
        ];
        for (i, (a, pa)) in ports.iter().enumerate() {
            for (b, pb) in &ports[i + 1..] {
                if pa == pb && *pa != 0 {
                    return Err(invalid(
                        path,
                        format!("[server] {a} and {b}"),
                        format!("both are {pa}"),
                        "give each its own port",
                    ));
                }
            }
        }
        let log_output = s.log_output.unwrap_or_else(|| "STDOUT".into());
        if log_output != "STDOUT" && log_output != "STDERR" && !log_output.starts_with('/') {
            return Err(invalid(
                path,
                "[server] LogOutput",
                format!("{log_output:?} is not STDOUT, STDERR or an absolute file path"),
                "use one of those",
            ));
        }
        if raw.repository.localization.trim().is_empty() {
            return Err(invalid(
                path,
                "[repository] Localization",
                "is empty",
                "set the repository's path or s3:// URL",
            ));
        }
        let base = path.parent().unwrap_or(Path::new("."));
        let clients_dir = base.join(&raw.clients.config_file);
        let mut cfg = Config {
            mgmt_port: ports[0].1,
            data_port: ports[1].1,
            rest_api_port: ports[2].1,
            log_output,
            debug: s.debug.unwrap_or(false),
            external_name,
            external_port: s.external_port.filter(|p| *p != 0),
            listen_address: s.data_transfer_interface.unwrap_or_else(|| "0.0.0.0".into()),
            login,
            repository: raw.repository.localization,
            clients_dir,
            clients: BTreeMap::new(),
            backups: BTreeMap::new(),
            schedules: BTreeMap::new(),
        };
        cfg.load_clients()?;
        Ok(cfg)
    }

    fn load_clients(&mut self) -> Result<(), ConfigError> {
        let dir = self.clients_dir.clone();
        let file = |name: &str| dir.join(name);
        let optional = |p: PathBuf| -> Result<String, ConfigError> {
            if p.exists() { read(&p) } else { Ok(String::new()) }
        };

        let bpath = file("backups.toml");
        let raw: BTreeMap<String, RawBackup> = parse(&bpath, &optional(bpath.clone())?)?;
        for (name, b) in raw {
            let key = |k: &str| format!("[{name}] {k}");
            if self.backups.contains_key(&b.id) {
                return Err(invalid(
                    &bpath,
                    key("ID"),
                    format!("{} is used twice", b.id),
                    "give each backup its own ID",
                ));
            }
            if b.paths.is_empty() {
                return Err(invalid(
                    &bpath,
                    key("Paths"),
                    "is empty",
                    "list at least one absolute path",
                ));
            }
            for p in &b.paths {
                if !p.starts_with('/') || p.split('/').any(|c| c == "..") {
                    return Err(invalid(
                        &bpath,
                        key("Paths"),
                        format!("{p:?} is not an absolute path without `..`"),
                        "use absolute paths",
                    ));
                }
            }
            let retention = match &b.retention {
                None => None,
                Some(v) => Some(parse_retention(v).map_err(|problem| {
                    invalid(&bpath, key("Retention"), problem, "use a number of snapshots to keep (7), a duration (\"30d\"), or a table like { daily = 7, weekly = 4 }")
                })?),
            };
            self.backups.insert(
                b.id,
                BackupDef {
                    id: b.id,
                    name: name.clone(),
                    description: b.description.unwrap_or_default(),
                    paths: b.paths,
                    excluded: b.excluded,
                    retention,
                },
            );
        }

        let spath = file("schedules.toml");
        let raw: BTreeMap<String, RawSchedule> = parse(&spath, &optional(spath.clone())?)?;
        for (name, s) in raw {
            let key = |k: &str| format!("[{name}] {k}");
            if self.schedules.contains_key(&s.id) {
                return Err(invalid(
                    &spath,
                    key("ID"),
                    format!("{} is used twice", s.id),
                    "give each schedule its own ID",
                ));
            }
            let when =
                crate::schedule::When::from_config(&s.frequency, s.hour.as_deref(), s.day.as_ref(), s.month)
                    .map_err(|(k, problem, fix)| invalid(&spath, key(k), problem, fix))?;
            self.schedules.insert(
                s.id,
                ScheduleDef {
                    id: s.id,
                    name,
                    description: s.description.unwrap_or_default(),
                    when,
                },
            );
        }

        let cpath = file("clients.toml");
        let raw: BTreeMap<String, RawClient> = parse(&cpath, &optional(cpath.clone())?)?;
        for (name, c) in raw {
            let key = |k: &str| format!("[{name}] {k}");
            if !valid_client_name(&name) {
                return Err(invalid(
                    &cpath,
                    format!("[{name}]"),
                    "is not a valid client name",
                    "use lower-case letters, digits, '-' and '.' (a DNS name like a node's), each part starting and ending with a letter or digit",
                ));
            }
            for id in &c.backups_ids {
                if !self.backups.contains_key(id) {
                    return Err(invalid(
                        &cpath,
                        key("BackupsIDs"),
                        format!("no backup has ID {id}"),
                        format!("define it in {}", bpath.display()),
                    ));
                }
            }
            for id in &c.schedules_ids {
                if !self.schedules.contains_key(id) {
                    return Err(invalid(
                        &cpath,
                        key("SchedulesIDs"),
                        format!("no schedule has ID {id}"),
                        format!("define it in {}", spath.display()),
                    ));
                }
            }
            self.clients.insert(
                name.clone(),
                ClientDef {
                    name,
                    ip_address: c.ip_address,
                    backups: c.backups_ids,
                    schedules: c.schedules_ids,
                },
            );
        }
        Ok(())
    }
}

/// Client names become DNS names in certificates: RFC 1123 labels.
/// A DNS subdomain, as Kubernetes node names are: dot-separated labels of
/// lower-case letters, digits and '-', at most 253 characters.
pub fn valid_client_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

fn parse_retention(v: &toml::Value) -> Result<RetentionPolicy, String> {
    let mut p = RetentionPolicy::default();
    match v {
        toml::Value::Integer(n) if *n > 0 => {
            p.keep_last = Some(u32::try_from(*n).map_err(|_| "too large".to_string())?)
        }
        toml::Value::String(s) => p.keep_within_secs = Some(parse_duration(s).map_err(|e| e.to_string())?),
        toml::Value::Table(t) => {
            for (k, v) in t {
                let n = || -> Result<u32, String> {
                    v.as_integer()
                        .and_then(|n| u32::try_from(n).ok())
                        .ok_or_else(|| format!("{k} must be a positive number"))
                };
                match k.as_str() {
                    "last" => p.keep_last = Some(n()?),
                    "hourly" => p.keep_hourly = Some(n()?),
                    "daily" => p.keep_daily = Some(n()?),
                    "weekly" => p.keep_weekly = Some(n()?),
                    "monthly" => p.keep_monthly = Some(n()?),
                    "yearly" => p.keep_yearly = Some(n()?),
                    "within" => {
                        p.keep_within_secs = Some(
                            parse_duration(v.as_str().ok_or("within must be a duration like \"30d\"")?)
                                .map_err(|e| e.to_string())?,
                        )
                    }
                    other => return Err(format!("unknown rule {other:?}")),
                }
            }
        }
        other => return Err(format!("{other} is not a retention rule")),
    }
    if p.is_empty() {
        return Err("keeps nothing".into());
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::valid_client_name;

    #[test]
    fn client_names_are_dns_names_like_nodes() {
        for ok in ["web-1", "ip-10-0-1-2.ec2.internal", "a", &"x".repeat(63)] {
            assert!(valid_client_name(ok), "{ok}");
        }
        for bad in [
            "",
            "Web",
            "-a",
            "a-",
            "a..b",
            ".a",
            "a.",
            "a/b",
            "a_b",
            &"x".repeat(64),
            &"a.".repeat(127),
        ] {
            assert!(!valid_client_name(bad), "{bad}");
        }
    }

    use super::*;

    const SERVER: &str = r#"
[server]
MgmtPort = 8090
DataPort = 8000
RestApiPort = 8080
LogOutput = "STDOUT"
Debug = false
ExternalName = "backup.example.test"
DataTransferInterface = "127.0.0.1"
Login = "admin"
Password = "s3cret"

[repository]
Localization = "/var/lib/backer/repo"

[clients]
ConfigFile = "clients.d/"
"#;

    const CLIENTS: &str = r#"
[web-1]
IPAddress = "10.0.0.5"
BackupsIDs = [1]
SchedulesIDs = [1, 2]
"#;

    const BACKUPS: &str = r#"
[etc]
ID = 1
Description = "system configuration"
Paths = ["/etc", "/var/www"]
Excluded = ["*.tmp"]
Retention = { daily = 7, weekly = 4 }
"#;

    const SCHEDULES: &str = r#"
[nightly]
ID = 1
Frequency = "daily"
Hour = "02:30:00"

[every-20]
ID = 2
Frequency = "*/20 * * * *"
"#;

    fn write(dir: &Path, server: &str, clients: &str, backups: &str, schedules: &str) -> PathBuf {
        std::fs::create_dir_all(dir.join("clients.d")).unwrap();
        std::fs::write(dir.join("server.toml"), server).unwrap();
        std::fs::write(dir.join("clients.d/clients.toml"), clients).unwrap();
        std::fs::write(dir.join("clients.d/backups.toml"), backups).unwrap();
        std::fs::write(dir.join("clients.d/schedules.toml"), schedules).unwrap();
        dir.join("server.toml")
    }

    fn err(server: &str, clients: &str, backups: &str, schedules: &str) -> String {
        let d = tempfile::tempdir().unwrap();
        Config::load(&write(d.path(), server, clients, backups, schedules))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn the_original_format_loads() {
        let d = tempfile::tempdir().unwrap();
        let c = Config::load(&write(d.path(), SERVER, CLIENTS, BACKUPS, SCHEDULES)).unwrap();
        assert_eq!(c.mgmt_port, 8090);
        assert_eq!(c.external_name, "backup.example.test");
        assert_eq!(c.login, Some(("admin".into(), "s3cret".into())));
        assert_eq!(c.clients["web-1"].backups, vec![1]);
        assert_eq!(c.backups[&1].paths, vec!["/etc", "/var/www"]);
        assert_eq!(c.backups[&1].retention.as_ref().unwrap().keep_daily, Some(7));
        assert_eq!(c.schedules[&1].when.expr, "30 2 * * *");
        assert_eq!(c.schedules[&2].when.expr, "*/20 * * * *");
        assert_eq!(c.external_port, None);
        // Behind a NodePort: agents dial another port than the one bound.
        let c = Config::load(&write(
            d.path(),
            &SERVER.replace("DataPort = 8000", "DataPort = 8000\nExternalPort = 30071"),
            CLIENTS,
            BACKUPS,
            SCHEDULES,
        ))
        .unwrap();
        assert_eq!(c.external_port, Some(30071));
    }

    #[test]
    fn errors_name_file_key_and_fix() {
        let e = err(
            &SERVER.replace("ExternalName = \"backup.example.test\"", ""),
            CLIENTS,
            BACKUPS,
            SCHEDULES,
        );
        assert!(
            e.contains("server.toml: [server] ExternalName: is missing or empty; set it"),
            "{e}"
        );
        let e = err(
            &SERVER.replace("Password = \"s3cret\"", ""),
            CLIENTS,
            BACKUPS,
            SCHEDULES,
        );
        assert!(e.contains("[server] Login/Password"), "{e}");
        let e = err(
            &SERVER.replace("Debug = false", "Debug = false\nColour = 1"),
            CLIENTS,
            BACKUPS,
            SCHEDULES,
        );
        assert!(e.contains("server.toml") && e.contains("Colour"), "{e}");
        let e = err(
            &SERVER.replace("DataPort = 8000", "DataPort = 8090"),
            CLIENTS,
            BACKUPS,
            SCHEDULES,
        );
        assert!(
            e.contains("MgmtPort and DataPort") && e.contains("both are 8090"),
            "{e}"
        );
        let e = err(SERVER, &CLIENTS.replace("[1]", "[9]"), BACKUPS, SCHEDULES);
        assert!(
            e.contains("clients.toml: [web-1] BackupsIDs: no backup has ID 9; define it in"),
            "{e}"
        );
        let e = err(
            SERVER,
            CLIENTS,
            &BACKUPS.replace("\"/etc\"", "\"etc\""),
            SCHEDULES,
        );
        assert!(e.contains("backups.toml: [etc] Paths"), "{e}");
        let e = err(
            SERVER,
            CLIENTS,
            &BACKUPS.replace("daily = 7", "hourlyish = 7"),
            SCHEDULES,
        );
        assert!(e.contains("[etc] Retention: unknown rule"), "{e}");
        let e = err(SERVER, CLIENTS, BACKUPS, &SCHEDULES.replace("02:30:00", "2pm"));
        assert!(e.contains("schedules.toml: [nightly] Hour"), "{e}");
        let e = err(SERVER, "[Bad_Name]\n", BACKUPS, SCHEDULES);
        assert!(e.contains("[Bad_Name]: is not a valid client name"), "{e}");
        let e = err("[server\n", CLIENTS, BACKUPS, SCHEDULES);
        assert!(e.contains("server.toml:"), "{e}");
    }
}
