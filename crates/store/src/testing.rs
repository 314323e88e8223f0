//! Test support (feature `testing`): a throwaway PostgreSQL cluster.
//!
//! [`TempPostgres::start`] runs Debian's `initdb` into a temp dir and
//! `pg_ctl` on a free 127.0.0.1 port (socket in the temp dir), never
//! relying on a system service; drop stops it and removes the files.
//! PostgreSQL refuses to run as root, so when we are root (CI, sessions) the
//! temp dir is given to the `postgres` user (created by the Debian package)
//! and the server binaries run through `runuser -u postgres --`.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;

pub struct TempPostgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
    as_postgres: bool,
    /// Extra `postgres -c` settings (TLS).
    extra_opts: String,
}

const INSTALL_HINT: &str = "PostgreSQL server binaries not found under /usr/lib/postgresql/*/bin \
     (or $PUBRUN_PG_BIN): install Debian's `postgresql` package (apt-get install -y postgresql)";

/// The newest `/usr/lib/postgresql/<version>/bin` holding `initdb` and `pg_ctl`.
pub fn find_bin_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("PUBRUN_PG_BIN") {
        return Some(PathBuf::from(dir));
    }
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let version: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            (bin.join("initdb").is_file() && bin.join("pg_ctl").is_file()).then_some((version, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, bin)| bin)
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind a free port")
        .port()
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

impl TempPostgres {
    /// Starts a fresh cluster. Panics (fails the test) with an install hint
    /// when PostgreSQL is not installed: these tests never skip silently.
    pub fn start() -> Self {
        let bin = find_bin_dir().unwrap_or_else(|| panic!("{INSTALL_HINT}"));
        let dir = tempfile::Builder::new()
            .prefix("pubrun-pg-")
            .tempdir()
            .expect("create a temp dir for PostgreSQL");
        let as_postgres = is_root();
        if as_postgres {
            run(
                Command::new("chown").arg("postgres:").arg(dir.path()),
                "chown the temp dir to postgres",
            );
        }
        let pg = TempPostgres {
            dir,
            bin,
            port: free_port(),
            as_postgres,
            extra_opts: String::new(),
        };
        let data = pg.data_dir();
        run(
            pg.pg_command("initdb")
                .arg("-D")
                .arg(&data)
                .args(["-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync"])
                .args(["--locale", "C"]),
            "initdb",
        );
        pg.pg_ctl_start();
        pg
    }

    /// Restarts the cluster with TLS on: a throwaway CA (`ca.pem` in the
    /// cluster's dir, returned) signs a certificate for 127.0.0.1 and
    /// localhost (made with `openssl`, which `.ci/run` installs).
    pub fn enable_tls(&mut self) -> PathBuf {
        let dir = self.dir.path().to_path_buf();
        std::fs::write(
            dir.join("leaf.ext"),
            "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
        )
        .expect("write leaf.ext");
        for args in [
            "req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=pubrun-test-ca -keyout ca.key -out ca.pem",
            "req -newkey rsa:2048 -nodes -subj /CN=127.0.0.1 -keyout server.key -out server.csr",
            "x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 -extfile leaf.ext -out server.crt",
        ] {
            run(
                Command::new("openssl")
                    .args(args.split(' '))
                    .current_dir(&dir),
                "openssl (install the openssl package)",
            );
        }
        run(
            Command::new("chmod")
                .arg("0600")
                .arg(dir.join("server.key")),
            "chmod server.key",
        );
        if self.as_postgres {
            run(
                Command::new("chown")
                    .arg("postgres:")
                    .arg(dir.join("server.key"))
                    .arg(dir.join("server.crt")),
                "chown the server key",
            );
        }
        self.stop();
        self.extra_opts = format!(
            " -c ssl=on -c ssl_cert_file={} -c ssl_key_file={}",
            dir.join("server.crt").display(),
            dir.join("server.key").display()
        );
        self.pg_ctl_start();
        dir.join("ca.pem")
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn pg_command(&self, tool: &str) -> Command {
        let exe = self.bin.join(tool);
        if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(exe);
            c
        } else {
            Command::new(exe)
        }
    }

    fn pg_ctl_start(&self) {
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200{}",
            self.port,
            self.dir.path().display(),
            self.extra_opts
        );
        run(
            self.pg_command("pg_ctl")
                .arg("-D")
                .arg(self.data_dir())
                .arg("-l")
                .arg(self.log_path())
                .args(["-w", "-t", "60", "-o", &opts, "start"]),
            "pg_ctl start",
        );
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// URL of the default `postgres` database.
    pub fn url(&self) -> String {
        self.url_for("postgres")
    }

    pub fn url_for(&self, db: &str) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/{db}?sslmode=disable",
            self.port
        )
    }

    /// Creates a database (for tests that want several stores on one cluster).
    pub fn create_database(&self, name: &str) {
        run(
            self.pg_command("createdb").args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                name,
            ]),
            "createdb",
        );
    }

    /// Stops the server (fast shutdown: clients are disconnected).
    pub fn stop(&self) {
        run(
            self.pg_command("pg_ctl")
                .arg("-D")
                .arg(self.data_dir())
                .args(["-w", "-m", "fast", "stop"]),
            "pg_ctl stop",
        );
    }

    /// Starts it again after [`Self::stop`], on the same port.
    pub fn start_again(&self) {
        self.pg_ctl_start();
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for TempPostgres {
    fn drop(&mut self) {
        let _ = self
            .pg_command("pg_ctl")
            .arg("-D")
            .arg(self.data_dir())
            .args(["-w", "-m", "immediate", "stop"])
            .output();
    }
}

fn run(cmd: &mut Command, what: &str) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run {cmd:?}: {e} ({INSTALL_HINT})"));
    pubrun_testkit::output_ok(what, &out);
}
