//! Debian's PgBouncer in transaction mode in front of a test cluster (the
//! stand-in for Neon's -pooler host), run as the postgres user on a free
//! port, stopped when dropped.

use std::fs;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::Duration;

use super::{eventually, free_port};

pub struct PgBouncer {
    pub port: u16,
    child: Child,
    dir: PathBuf,
}

impl PgBouncer {
    /// Pools `database` of the cluster on `server_port`, logged in as
    /// `user` whoever the client says it is (auth_type any).
    pub fn start(server_port: u16, database: &str, user: &str) -> PgBouncer {
        let port = free_port();
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
        let mut command = if super::running_as_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--", program]);
            c
        } else {
            Command::new(program)
        };
        let child = command.arg(&ini).spawn().expect("start pgbouncer");
        eventually(Duration::from_secs(10), "pgbouncer to listen", || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        PgBouncer { port, child, dir }
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("pgbouncer.log")).unwrap_or_default()
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        // NB: runuser passes SIGTERM on to pgbouncer.
        // SAFETY: kill(2) on the pid of our own child, not yet waited for.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
        let _ = fs::remove_dir_all(&self.dir);
    }
}
