//! Every manifest in deploy/ passes a server-side dry run against the real API server
//! (schema, defaulting and admission, without persisting anything).

use std::path::Path;

use xlb_tests::kube::KubeServer;

#[test]
fn kube_deploy_manifests_pass_server_side_dry_run() {
    let server = KubeServer::shared();
    let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
    let mut manifests: Vec<_> = std::fs::read_dir(&deploy)
        .expect("read deploy/")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        // xlb.example.yaml is the agent's config file, not a Kubernetes manifest.
        .filter(|p| !p.file_name().is_some_and(|n| n == "xlb.example.yaml"))
        .collect();
    manifests.sort();
    assert!(
        manifests.len() >= 5,
        "expected the deploy manifests, found {manifests:?}"
    );
    for manifest in &manifests {
        let path = manifest.display().to_string();
        let (ok, out) = server.kubectl(&["apply", "--dry-run=server", "-f", &path]);
        assert!(ok, "{path} failed the server-side dry run:\n{out}");
        assert!(out.contains("(server dry run)"), "{path}: {out}");
    }
}
