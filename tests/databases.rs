//! Several databases on one server: the launcher gives each database with
//! the extension a delivery worker of its own, started by CREATE EXTENSION
//! and stopped by DROP EXTENSION without a server restart; DROP DATABASE
//! works without FORCE; each database's pipeline.status() shows its worker.

mod support;

use std::time::Duration;

use support::behaviours::{emit, register};
use support::receiver::Receiver;
use support::{eventually, one, texts, Cluster};

const DATABASES: [&str; 3] = ["alpha", "beta", "gamma"];

/// The workers running, as "database pid", sorted.
fn workers(admin: &mut postgres::Client) -> Vec<String> {
    texts(
        admin,
        "SELECT coalesce(datname, '?') || ' ' || pid FROM pg_stat_activity
         WHERE backend_type = 'pipeline_ext worker' ORDER BY 1",
    )
}

fn running_in(admin: &mut postgres::Client) -> Vec<String> {
    workers(admin)
        .into_iter()
        .map(|w| w.split(' ').next().unwrap().to_string())
        .collect()
}

/// The worker pid that a database's pipeline.status() reports, once it runs.
fn status_pid(client: &mut postgres::Client) -> i32 {
    let mut pid = None;
    eventually(Duration::from_secs(20), "the database's worker", || {
        pid = one::<Option<i32>>(client, "SELECT worker_pid FROM pipeline.status()");
        pid.is_some()
    });
    pid.unwrap()
}

fn delivered_to(receiver: &Receiver, path: &str, n: usize, what: &str) {
    receiver.wait_for(Duration::from_secs(20), what, |requests| {
        requests.iter().filter(|r| r.path == path).count() >= n
    });
}

#[test]
fn each_database_with_the_extension_has_its_own_worker() {
    let receiver = Receiver::ok();
    // NB: no pipeline.database: every database with the extension is served.
    let cluster = Cluster::start("databases", &[("shared_preload_libraries", "pipeline_ext")]);
    let mut admin = cluster.connect("postgres", "postgres");
    for database in DATABASES {
        admin
            .batch_execute(&format!("CREATE DATABASE {database}"))
            .unwrap();
    }
    // Without the extension anywhere, no worker stays.
    eventually(
        Duration::from_secs(20),
        "no worker without the extension",
        || workers(&mut admin).is_empty(),
    );

    let mut clients = Vec::new();
    let mut pids = Vec::new();
    for database in DATABASES {
        let mut client = cluster.connect(database, "postgres");
        client
            .batch_execute("CREATE EXTENSION pipeline_ext")
            .unwrap();
        let pid = status_pid(&mut client);
        assert_eq!(
            one::<String>(
                &mut admin,
                &format!("SELECT datname::text FROM pg_stat_activity WHERE pid = {pid}")
            ),
            database,
            "pipeline.status() in {database} names a worker of another database"
        );
        register(
            &mut client,
            "ping",
            &receiver.url(&format!("/{database}")),
            "",
        );
        emit(&mut client, "ping", 2);
        clients.push(client);
        pids.push(pid);
    }
    for database in DATABASES {
        delivered_to(&receiver, &format!("/{database}"), 2, database);
    }
    assert_eq!(running_in(&mut admin), DATABASES);

    // DROP DATABASE without FORCE, while the others deliver.
    let gamma = clients.pop().unwrap();
    drop(gamma);
    emit(&mut clients[0], "ping", 1);
    admin.batch_execute("DROP DATABASE gamma").unwrap();
    delivered_to(&receiver, "/alpha", 3, "alpha during the drop");
    // The stopped worker is started again after 5 s, finds its database
    // gone and ends for good.
    std::thread::sleep(Duration::from_secs(7));
    assert_eq!(running_in(&mut admin), ["alpha", "beta"]);
    assert!(
        cluster
            .log()
            .contains("pipeline_ext worker: its database was dropped"),
        "{}",
        cluster.log()
    );

    // DROP EXTENSION ends beta's worker; CREATE EXTENSION brings one back.
    clients[1]
        .batch_execute("DROP EXTENSION pipeline_ext CASCADE")
        .unwrap();
    eventually(Duration::from_secs(20), "beta's worker to end", || {
        running_in(&mut admin) == ["alpha"]
    });
    clients[1]
        .batch_execute("CREATE EXTENSION pipeline_ext")
        .unwrap();
    let beta = status_pid(&mut clients[1]);
    assert_ne!(beta, pids[1]);
    register(&mut clients[1], "ping", &receiver.url("/beta-again"), "");
    emit(&mut clients[1], "ping", 1);
    delivered_to(&receiver, "/beta-again", 1, "beta after CREATE EXTENSION");

    // An extension in template1 gets no worker (it would make CREATE
    // DATABASE fail); a database made from it gets one.
    let mut template = cluster.connect("template1", "postgres");
    template
        .batch_execute("CREATE EXTENSION pipeline_ext")
        .unwrap();
    drop(template);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(running_in(&mut admin), ["alpha", "beta"]);
    admin.batch_execute("CREATE DATABASE delta").unwrap();
    eventually(Duration::from_secs(30), "delta's worker", || {
        running_in(&mut admin) == ["alpha", "beta", "delta"]
    });

    // After a restart the launcher finds them again.
    drop(clients);
    drop(admin);
    cluster.stop();
    cluster.start_again();
    let mut admin = cluster.connect("postgres", "postgres");
    eventually(
        Duration::from_secs(30),
        "the workers after a restart",
        || running_in(&mut admin) == ["alpha", "beta", "delta"],
    );
    let mut alpha = cluster.connect("alpha", "postgres");
    emit(&mut alpha, "ping", 1);
    delivered_to(&receiver, "/alpha", 4, "alpha after the restart");
}

/// A pipeline.database naming no database is said in the log (nothing
/// would be delivered anywhere otherwise, silently), and said to be served
/// once it exists.
#[test]
fn a_misnamed_pipeline_database_is_said() {
    let cluster = Cluster::start(
        "databases-misnamed",
        &[
            ("shared_preload_libraries", "pipeline_ext"),
            ("pipeline.database", "no_such_db"),
        ],
    );
    eventually(Duration::from_secs(20), "the warning", || {
        cluster
            .log()
            .contains("pipeline.database names \"no_such_db\", which does not exist")
    });
    let mut admin = cluster.connect("postgres", "postgres");
    admin.batch_execute("CREATE DATABASE no_such_db").unwrap();
    eventually(Duration::from_secs(20), "the database served", || {
        cluster
            .log()
            .contains("pipeline.database \"no_such_db\" can be served now")
    });
}

/// Databases without the extension take no worker slot, and a dropped
/// database gives its slot back: a role that may only create databases
/// makes and drops more of them than there are slots, and a database made
/// afterwards still gets its worker.
#[test]
fn databases_without_the_extension_use_no_worker_slot() {
    let cluster = Cluster::start(
        "databases-churn",
        &[
            ("shared_preload_libraries", "pipeline_ext"),
            // Room for a worker in each at once, so that every one of them
            // has started (and, before the fix, taken a slot) by the time
            // they are dropped.
            ("max_worker_processes", "90"),
        ],
    );
    let mut admin = cluster.connect("postgres", "postgres");
    admin
        .batch_execute("CREATE ROLE maker LOGIN CREATEDB")
        .unwrap();
    let mut maker = cluster.connect("postgres", "maker");
    let many = 66; // more than the 64 slots
    for i in 0..many {
        maker
            .batch_execute(&format!("CREATE DATABASE churn_{i}"))
            .unwrap();
    }
    // The launcher looks for new databases every 10 s and starts a worker
    // in each, which finds no extension and ends.
    std::thread::sleep(Duration::from_secs(13));
    eventually(Duration::from_secs(20), "no worker stays", || {
        workers(&mut admin).is_empty()
    });
    for i in 0..many {
        maker
            .batch_execute(&format!("DROP DATABASE churn_{i}"))
            .unwrap();
    }
    admin.batch_execute("CREATE DATABASE after_churn").unwrap();
    let mut client = cluster.connect("after_churn", "postgres");
    client
        .batch_execute("CREATE EXTENSION pipeline_ext")
        .unwrap();
    status_pid(&mut client);
    assert!(!cluster.log().contains("no slot for database"));
}

/// With the extension in template1, a role that may only create databases
/// gets workers for pipeline.workers_per_owner of them; the next is named
/// in the log, and the administrator's databases still get theirs.
#[test]
fn one_owner_takes_at_most_its_share_of_workers() {
    let cluster = Cluster::start(
        "databases-per-owner",
        &[
            ("shared_preload_libraries", "pipeline_ext"),
            ("pipeline.workers_per_owner", "2"),
        ],
    );
    let mut template = cluster.connect("template1", "postgres");
    template
        .batch_execute("CREATE EXTENSION pipeline_ext")
        .unwrap();
    drop(template);
    let mut admin = cluster.connect("postgres", "postgres");
    admin
        .batch_execute("CREATE ROLE maker LOGIN CREATEDB")
        .unwrap();
    let mut maker = cluster.connect("postgres", "maker");
    for name in ["mine_a", "mine_b", "mine_c"] {
        maker
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .unwrap();
    }
    eventually(Duration::from_secs(40), "two workers for maker", || {
        running_in(&mut admin)
            .iter()
            .filter(|d| d.starts_with("mine_"))
            .count()
            == 2
    });
    eventually(Duration::from_secs(30), "the refusal named", || {
        cluster
            .log()
            .contains("gets no delivery worker: its owner already has 2 databases with one (pipeline.workers_per_owner = 2)")
    });
    // A superuser's database is not capped.
    for name in ["admin_a", "admin_b", "admin_c"] {
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .unwrap();
    }
    eventually(
        Duration::from_secs(40),
        "the administrator's workers",
        || {
            running_in(&mut admin)
                .iter()
                .filter(|d| d.starts_with("admin_"))
                .count()
                == 3
        },
    );
    std::thread::sleep(Duration::from_secs(11));
    assert_eq!(
        running_in(&mut admin)
            .iter()
            .filter(|d| d.starts_with("mine_"))
            .count(),
        2,
        "still two for maker"
    );
}
