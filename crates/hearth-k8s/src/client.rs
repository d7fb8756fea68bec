//! Building a `kube::Client`: from an explicit kubeconfig file, or inferred (in-cluster service account,
//! then `$KUBECONFIG` / `~/.kube/config`).

use std::path::Path;

use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};

use crate::error::K8sError;

pub async fn client(kubeconfig: Option<&Path>) -> Result<Client, K8sError> {
    let config = match kubeconfig {
        Some(path) => {
            let what = format!("kubeconfig {}", path.display());
            let kc = Kubeconfig::read_from(path).map_err(|e| K8sError::Config {
                what: what.clone(),
                message: e.to_string(),
            })?;
            Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .map_err(|e| K8sError::Config {
                    what,
                    message: e.to_string(),
                })?
        }
        None => Config::infer().await.map_err(|e| K8sError::Config {
            what: "the environment (in-cluster service account, $KUBECONFIG, ~/.kube/config)"
                .into(),
            message: e.to_string(),
        })?,
    };
    Client::try_from(config).map_err(|e| K8sError::Config {
        what: "the loaded configuration".into(),
        message: e.to_string(),
    })
}
