// Stand-ins for the Halibut types that appear on the wire, compiled into an
// assembly named "Halibut" so Json.NET writes the same "$type" names as the
// real library ("Halibut.Transport.Protocol.RequestMessage, Halibut").
// Only the serialized shape is reproduced: the same namespaces, class names,
// public properties in declaration order and [JsonProperty] names as
// OctopusDeploy/Halibut (RequestMessage.cs, ResponseMessage.cs,
// ServerError.cs, DataStream.cs, ServiceEndPoint.cs, ProxyDetails.cs).
using System;
using Newtonsoft.Json;

namespace Halibut
{
    public class DataStream
    {
        [JsonProperty("id")]
        public Guid Id { get; set; }

        [JsonProperty("length")]
        public long Length { get; set; }
    }

    public class ProxyDetails
    {
        public ProxyDetails(string host, int port, Halibut.Transport.Proxy.ProxyType type, string userName, string password)
        {
            Host = host;
            Port = port;
            Type = type;
            UserName = userName;
            Password = password;
        }

        public string Host { get; private set; }
        public int Port { get; private set; }
        public string UserName { get; private set; }
        public string Password { get; private set; }
        public Halibut.Transport.Proxy.ProxyType Type { get; private set; }
    }

    public class ServiceEndPoint
    {
        public ServiceEndPoint(Uri baseUri, string remoteThumbprint, ProxyDetails proxy)
        {
            BaseUri = baseUri;
            RemoteThumbprint = remoteThumbprint;
            Proxy = proxy;
            // HalibutTimeoutsAndLimits.RecommendedValues()
            PollingRequestQueueTimeout = TimeSpan.FromMinutes(2);
            RetryListeningSleepInterval = TimeSpan.FromSeconds(1);
            RetryCountLimit = 5;
            ConnectionErrorRetryTimeout = TimeSpan.FromMinutes(5);
            TcpClientConnectTimeout = TimeSpan.FromSeconds(60);
        }

        public TimeSpan PollingRequestQueueTimeout { get; set; }
        public TimeSpan RetryListeningSleepInterval { get; set; }
        public int RetryCountLimit { get; set; }
        public TimeSpan ConnectionErrorRetryTimeout { get; set; }
        public TimeSpan TcpClientConnectTimeout { get; set; }
        public Uri BaseUri { get; private set; }
        public string RemoteThumbprint { get; private set; }
        public ProxyDetails Proxy { get; private set; }
        public Uri ForceResolveHost { get; set; }
        public bool IsWebSocketEndpoint { get { return BaseUri.Scheme == "wss"; } }
    }
}

namespace Halibut.Transport.Proxy
{
    public enum ProxyType
    {
        None,
        HTTP,
        SOCKS4,
        SOCKS4A,
        SOCKS5
    }
}

namespace Halibut.Transport.Protocol
{
    public class RequestMessage
    {
        [JsonProperty("id")]
        public string Id { get; set; }

        [JsonProperty("activityId")]
        public Guid ActivityId { get; set; }

        [JsonProperty("endpoint")]
        public ServiceEndPoint Destination { get; set; }

        [JsonProperty("service")]
        public string ServiceName { get; set; }

        [JsonProperty("method")]
        public string MethodName { get; set; }

        [JsonProperty("params")]
        public object[] Params { get; set; }
    }

    public class ResponseMessage
    {
        [JsonProperty("id")]
        public string Id { get; set; }

        [JsonProperty("error")]
        public ServerError Error { get; set; }

        [JsonProperty("result")]
        public object Result { get; set; }
    }

    public class ServerError
    {
        [JsonProperty("message")]
        public string Message { get; set; }

        [JsonProperty("details")]
        public string Details { get; set; }

        public string HalibutErrorType { get; set; }

        [JsonIgnore]
        public int ConnectionState { get; set; }
    }
}
