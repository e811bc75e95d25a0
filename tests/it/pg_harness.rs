//! The PostgreSQL harness itself: the shared server gives each caller a
//! database of its own; a private server keeps its data across a restart
//! on the same port; a PostgreSQL gateway's config names its database.

use plugboard_tests::gateway::{config_text, Engine};
use plugboard_tests::postgres::{self, database_name, PgOptions, PgServer};
use plugboard_tests::GatewayOptions;

#[test]
fn the_shared_server_gives_each_caller_a_database_of_its_own() {
    let pg = postgres::shared();
    let a = pg.create_database();
    let b = pg.create_database();
    assert_ne!(a, b);
    for url in [&a, &b] {
        assert!(
            url.starts_with(&format!("postgres://postgres@127.0.0.1:{}/", pg.port())),
            "{url}"
        );
        assert_eq!(pg.psql(url, "select 1"), "1\n");
        assert_eq!(
            pg.psql(url, "select current_database()").trim(),
            database_name(url)
        );
    }
    // UTF-8 text, and byte order for text keys (like SQLite's BINARY).
    assert_eq!(
        pg.psql(&a, "show server_encoding; show lc_collate"),
        "UTF8\nC\n"
    );
    // Distinct databases: a table made in one is not in the other.
    pg.psql(&a, "create table only_in_a (x int)");
    let count = "select count(*) from pg_tables where tablename = 'only_in_a'";
    assert_eq!(pg.psql(&a, count).trim(), "1");
    assert_eq!(pg.psql(&b, count).trim(), "0");
    // One server per process, from any thread.
    let port = std::thread::spawn(|| postgres::shared().port())
        .join()
        .unwrap();
    assert_eq!(port, pg.port());
    pg.drop_database(&a);
    pg.drop_database(&b);
    let left = format!(
        "select count(*) from pg_database where datname in ('{}', '{}')",
        database_name(&a),
        database_name(&b)
    );
    assert_eq!(pg.psql("postgres", &left).trim(), "0");
}

#[test]
fn a_private_server_keeps_its_data_across_a_stop_and_a_start() {
    let pg = PgServer::start(PgOptions::fast());
    let url = pg.create_database();
    pg.psql(
        &url,
        "create table kept (v text); insert into kept values ('before')",
    );
    let port = pg.port();
    pg.stop();
    assert!(!pg.is_running());
    let refused = std::process::Command::new(postgres::find_bindir().unwrap().join("psql"))
        .args(["-X", "-d", &url, "-c", "select 1"])
        .output()
        .unwrap();
    assert!(!refused.status.success(), "a stopped server answered");
    pg.start_again();
    assert_eq!(pg.port(), port);
    assert_eq!(
        pg.url("x"),
        format!("postgres://postgres@127.0.0.1:{port}/x")
    );
    assert_eq!(pg.psql(&url, "select v from kept"), "before\n");
    pg.psql(&url, "insert into kept values ('between')");
    pg.restart();
    assert_eq!(
        pg.psql(&url, "select string_agg(v, ',' order by v) from kept"),
        "before,between\n"
    );
    let root = pg.data_dir().parent().unwrap().to_path_buf();
    drop(pg);
    assert!(!root.exists(), "{} is left behind", root.display());
}

#[test]
fn a_postgres_gateway_config_names_its_database_and_a_sqlite_one_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let url = "postgres://postgres@127.0.0.1:5432/pb_1_1";
    let opts = GatewayOptions::default().extra("[storage]\npool_size = 4\n");
    let config: toml::Table = config_text(&data, &opts, Some(url)).parse().unwrap();
    let storage = config["storage"].as_table().unwrap();
    assert_eq!(storage["backend"].as_str(), Some("postgres"));
    assert_eq!(storage["url"].as_str(), Some(url));
    assert_eq!(storage["pool_size"].as_integer(), Some(4), "extra merges");
    let config: toml::Table = config_text(&data, &GatewayOptions::default(), None)
        .parse()
        .unwrap();
    assert!(!config.contains_key("storage"), "{config}");
    // The builders.
    let forced = GatewayOptions::default().engine(Engine::Postgres);
    assert_eq!(forced.engine, Engine::Postgres);
    let given = GatewayOptions::default().postgres_database(url);
    assert_eq!(
        (given.engine, given.database_url.as_deref()),
        (Engine::Postgres, Some(url))
    );
    assert_eq!(GatewayOptions::default().engine, Engine::from_env());
}
