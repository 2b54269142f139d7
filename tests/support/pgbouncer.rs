//! Debian's PgBouncer in transaction mode in front of a test cluster (the
//! stand-in for Neon's -pooler host), run as the postgres user on a free
//! port, stopped when dropped. Standalone: bench/ includes it too.

use std::fs;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

pub struct PgBouncer {
    pub port: u16,
    child: Child,
    dir: PathBuf,
}

impl PgBouncer {
    /// Pools `database` of the cluster on `server_port`, logged in as
    /// `user` whoever the client says it is (auth_type any).
    pub fn start(server_port: u16, database: &str, user: &str) -> PgBouncer {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let dir = std::env::temp_dir().join(format!(
            "pipeline_ext-pgbouncer-{}-{port}",
            std::process::id()
        ));
        fs::create_dir_all(&dir).unwrap();
        let ini = dir.join("pgbouncer.ini");
        fs::write(
            &ini,
            format!(
                "[databases]\n{database} = host=127.0.0.1 port={server_port} dbname={database} user={user}\n\n\
                 [pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n\
                 auth_type = any\npool_mode = transaction\nmax_client_conn = 200\n\
                 default_pool_size = 4\nignore_startup_parameters = extra_float_digits,options\n\
                 logfile = {log}\nserver_reset_query =\n",
                log = dir.join("pgbouncer.log").display()
            ),
        )
        .unwrap();
        let _ = Command::new("chown")
            .arg("-R")
            .arg("postgres:postgres")
            .arg(&dir)
            .status();
        let program = ["/usr/sbin/pgbouncer", "/usr/bin/pgbouncer"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .expect("pgbouncer is not installed: bin/setup installs Debian's pgbouncer");
        let root = Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
        let mut command = if root {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--", program]);
            c
        } else {
            Command::new(program)
        };
        let child = command
            .arg(&ini)
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start pgbouncer");
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "pgbouncer did not listen"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        PgBouncer { port, child, dir }
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("pgbouncer.log")).unwrap_or_default()
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        // NB: runuser passes SIGTERM on to pgbouncer.
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
        let _ = fs::remove_dir_all(&self.dir);
    }
}
