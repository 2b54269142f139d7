//! The Debian packages of bin/package on this machine's PostgreSQL 15: both
//! installed with `dpkg -i` into a PostgreSQL 15 that has no other copy of
//! pipeline_ext; a cluster with the packaged library preloaded creates the
//! extension and delivers an event, and the packaged pipeline-relay
//! delivers for a trigger-only install made from the package's SQL.
//!
//! Ignored by default: it installs packages system-wide. bin/test runs it as
//! root after bin/package, and it removes them again.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use support::behaviours::{emit, register};
use support::receiver::Receiver;
use support::{one, pg_config, repo_root, Cluster};

const EXTENSION_PACKAGE: &str = "postgresql-15-pipeline-ext";
const RELAY_PACKAGE: &str = "pipeline-relay";

fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The files of a development install (cargo pgrx install), moved aside
/// while the packages are tested and put back afterwards, whatever happens.
struct Aside {
    moved: Vec<(PathBuf, PathBuf)>,
}

impl Aside {
    fn everything_of_pipeline_ext(into: &Path) -> Aside {
        std::fs::create_dir_all(into).unwrap();
        let mut moved = Vec::new();
        for dir in [
            pg_config("--pkglibdir"),
            pg_config("--sharedir").join("extension"),
        ] {
            for entry in std::fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                let name = path.file_name().unwrap().to_string_lossy().into_owned();
                if name.starts_with("pipeline_ext") {
                    let to = into.join(format!("{}-{name}", moved.len()));
                    std::fs::rename(&path, &to).unwrap();
                    moved.push((path, to));
                }
            }
        }
        Aside { moved }
    }
}

impl Drop for Aside {
    fn drop(&mut self) {
        for package in [EXTENSION_PACKAGE, RELAY_PACKAGE] {
            let _ = Command::new("dpkg").args(["--purge", package]).output();
        }
        for (path, aside) in &self.moved {
            let _ = std::fs::rename(aside, path);
        }
    }
}

#[test]
#[ignore = "installs packages system-wide: bin/test runs it after bin/package"]
fn the_packages_install_and_deliver() {
    // SAFETY: getuid has no preconditions.
    assert_eq!(unsafe { libc::getuid() }, 0, "dpkg -i needs root");
    let version = env!("CARGO_PKG_VERSION");
    let arch = run("dpkg", &["--print-architecture"]).trim().to_string();
    let debs = repo_root().join("target/debian");
    let extension_deb = debs.join(format!("{EXTENSION_PACKAGE}_{version}_{arch}.deb"));
    let relay_deb = debs.join(format!("{RELAY_PACKAGE}_{version}_{arch}.deb"));
    for deb in [&extension_deb, &relay_deb] {
        assert!(
            deb.exists(),
            "{} is missing: run bin/package",
            deb.display()
        );
    }

    let _aside = Aside::everything_of_pipeline_ext(
        &std::env::temp_dir().join(format!("pipeline_ext-package-aside-{}", std::process::id())),
    );
    assert!(!pg_config("--pkglibdir").join("pipeline_ext.so").exists());
    run(
        "dpkg",
        &[
            "-i",
            extension_deb.to_str().unwrap(),
            relay_deb.to_str().unwrap(),
        ],
    );
    // Every file comes from the package.
    let library = pg_config("--pkglibdir").join("pipeline_ext.so");
    assert!(run("dpkg", &["-S", library.to_str().unwrap()]).starts_with(EXTENSION_PACKAGE));
    let files = run("dpkg", &["-L", EXTENSION_PACKAGE]);
    for file in [
        "pipeline_ext.control".to_string(),
        format!("pipeline_ext--{version}.sql"),
        format!("pipeline_ext--0.1.0--{version}.sql"),
    ] {
        assert!(files.contains(&file), "the package lacks {file}:\n{files}");
    }

    // The extension, from the package, delivers.
    let receiver = Receiver::ok();
    let cluster = Cluster::start("package", &[("shared_preload_libraries", "pipeline_ext")]);
    let mut db = cluster.connect("postgres", "postgres");
    db.batch_execute("CREATE EXTENSION pipeline_ext").unwrap();
    assert_eq!(
        one::<String>(
            &mut db,
            "SELECT extversion FROM pg_extension WHERE extname = 'pipeline_ext'"
        ),
        version
    );
    register(&mut db, "ping", &receiver.url("/extension"), "");
    emit(&mut db, "ping", 1);
    receiver.wait_for(Duration::from_secs(20), "the extension's delivery", |r| {
        r.iter().any(|r| r.path == "/extension")
    });
    assert!(one::<bool>(
        &mut db,
        "SELECT worker_running FROM pipeline.status()"
    ));

    // The relay, from the package, delivers for a trigger-only install made
    // from the package's SQL.
    db.batch_execute("CREATE ROLE app_owner LOGIN NOSUPERUSER")
        .unwrap();
    db.batch_execute("CREATE DATABASE neon OWNER app_owner")
        .unwrap();
    let script = "/usr/share/pipeline-relay/sql/pipeline_ext_trigger_only.sql";
    let out = cluster.psql("neon", "app_owner", &["-q", "-f", script]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut neon = cluster.connect("neon", "app_owner");
    register(&mut neon, "ping", &receiver.url("/relay"), "");
    emit(&mut neon, "ping", 1);
    let url = format!(
        "postgres://app_owner@127.0.0.1:{}/neon?sslmode=disable",
        cluster.port
    );
    let relay = Command::new("/usr/bin/pipeline-relay")
        .args(["--database-url", &url, "--once"])
        .env_remove("DATABASE_URL")
        .output()
        .unwrap();
    assert!(
        relay.status.success(),
        "{}",
        String::from_utf8_lossy(&relay.stderr)
    );
    receiver.wait_for(Duration::from_secs(10), "the relay's delivery", |r| {
        r.iter().any(|r| r.path == "/relay")
    });
    drop(db);
    drop(neon);
    cluster.stop();
}
