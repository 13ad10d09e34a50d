import { describe, expect, it } from 'vitest';
import { parseSourceUri } from '../../src/node-stack/go-nri-plugin.js';

describe('parseSourceUri', () => {
  const printed = [
    'Reading package lists...',
    "'http://deb.debian.org/debian/pool/main/g/golang-github-containerd-nri/golang-github-containerd-nri_0.8.0-1.dsc' golang-github-containerd-nri_0.8.0-1.dsc 2797 SHA256:1b182d883bbefddaba29c70568f71225f3497ed915d9c8615014db1599d3db78",
    "'http://deb.debian.org/debian/pool/main/g/golang-github-containerd-nri/golang-github-containerd-nri_0.8.0.orig.tar.gz' golang-github-containerd-nri_0.8.0.orig.tar.gz 489874 SHA256:" + 'ab'.repeat(32),
  ].join('\n');

  it('finds the upstream tarball with the hash apt read from the Sources index', () => {
    expect(parseSourceUri(printed, '.orig.tar.gz')).toEqual({
      uri: 'http://deb.debian.org/debian/pool/main/g/golang-github-containerd-nri/golang-github-containerd-nri_0.8.0.orig.tar.gz',
      file: 'golang-github-containerd-nri_0.8.0.orig.tar.gz',
      sha256: 'ab'.repeat(32),
    });
  });

  it('gives nothing when the file is not listed or its hash is not a SHA256', () => {
    expect(parseSourceUri(printed.split('\n').slice(0, 2).join('\n'), '.orig.tar.gz')).toBeUndefined();
    expect(parseSourceUri("'http://x/a.orig.tar.gz' a.orig.tar.gz 1 MD5Sum:abc", '.orig.tar.gz')).toBeUndefined();
  });
});
