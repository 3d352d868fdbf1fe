pub(crate) fn run(_bytes: u64) -> anyhow::Result<()> {
    anyhow::bail!("demo: not yet")
}
